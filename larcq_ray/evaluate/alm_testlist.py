"""Seed 004's test list: {"annotation": [{"testset_id", "path", "task", "test"?}, ...]}.

A file that is not JSON, or has no "annotation" list, is one LarcqError: nothing can be evaluated.
A single bad entry (not an object, a missing or non-text field, an unknown task, a repeated
testset_id) costs only itself: it becomes an entry with an `error`, which eval-alm reports as an
error row with an empty prediction, never a crash.

`select` splits the list for one task the same way eval-alm and validate-submission do: entries of
the other known task are skipped (the seed's lists mix both), everything else is this task's, errors
included.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from larcq_ray.core.errors import LarcqError
from larcq_ray.evaluate.alm_config import SEED_TASKS

KNOWN_TASKS = tuple(SEED_TASKS.values())  # "asr", "audiocaption_v2"


@dataclass(frozen=True)
class TestEntry:
    index: int  # position in "annotation"
    testset_id: Optional[str]  # None when the entry has no usable id (it cannot be in a submission)
    path: str  # as resolved (absolute when a root was given), "" when missing
    task: str  # as written ("" when missing)
    reference: Optional[str]  # the "test" field; None for blind sets
    error: str = ""  # "malformed: ..." / "unknown task: ..." / "duplicate: ..."

    @property
    def row_id(self) -> str:
        """The id predictions.parquet uses: the testset_id, or `#<index>` for an entry without one."""
        return self.testset_id if self.testset_id is not None else f"#{self.index}"


def _text(value) -> Optional[str]:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # ids written as numbers
        return str(value)
    return None


def parse_entries(data, root: Optional[Path] = None) -> list[TestEntry]:
    """Entries of an already-loaded test list; `root`: where relative audio paths are read."""
    if not isinstance(data, dict) or "annotation" not in data:
        raise LarcqError('no "annotation" list (expected {"annotation": [{"testset_id", '
                         '"path", "task", "test"?}, ...]})')
    items = data["annotation"]
    if not isinstance(items, list):
        raise LarcqError(f'the test list\'s "annotation" must be a list of entries, got {type(items).__name__}')
    out: list[TestEntry] = []
    seen: Counter = Counter()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            out.append(TestEntry(i, None, "", "", None, f"malformed: entry {i} is a {type(item).__name__}, "
                                                        "not an object"))
            continue
        tid = _text(item.get("testset_id"))
        raw_path = item.get("path")
        task = item.get("task") if isinstance(item.get("task"), str) else ""
        ref = item.get("test")
        path = ""
        if isinstance(raw_path, str) and raw_path.strip():
            p = Path(raw_path).expanduser()
            path = str(root / p) if root is not None and not p.is_absolute() else str(p)
        problems = []
        if tid is None:
            problems.append("no testset_id" if "testset_id" not in item else "testset_id is not a non-empty text")
        if not path:
            problems.append("no path" if "path" not in item else "path is not a non-empty text")
        if not task:
            problems.append("no task" if "task" not in item else "task is not a text")
        if ref is not None and not isinstance(ref, str):
            problems.append("test (the reference) is not a text")
            ref = None
        error = f"malformed: {'; '.join(problems)}" if problems else ""
        if not error and task not in KNOWN_TASKS:
            error = f"unknown task: {task!r} (known: {', '.join(KNOWN_TASKS)})"
        if tid is not None:
            seen[tid] += 1
            if seen[tid] > 1 and not error:
                error = f"duplicate: testset_id {tid!r} appears more than once; only its first entry is evaluated"
        out.append(TestEntry(i, tid, path, task, ref, error))
    return out


def read_test_list(path: str | Path, audio_root: str | Path | None = None) -> list[TestEntry]:
    """Parse the test list at `path`; relative audio paths under `audio_root` (None: the list's folder)."""
    path = Path(path)
    if not path.is_file():
        raise LarcqError(f"test list not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LarcqError(f"test list {path} is not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise LarcqError(f"test list {path} is not valid JSON: {e}") from None
    root = Path(audio_root) if audio_root is not None else path.parent
    try:
        return parse_entries(data, root)
    except LarcqError as e:
        raise LarcqError(f"test list {path}: {e}") from None


@dataclass(frozen=True)
class TaskSelection:
    task: str  # "asr" | "aac"
    seed_task: str  # "asr" | "audiocaption_v2"
    entries: list[TestEntry]  # this task's, in list order: to run (error == "") and error rows
    skipped_other_task: int  # entries of the other known task

    @property
    def to_run(self) -> list[TestEntry]:
        return [e for e in self.entries if not e.error]

    @property
    def errors(self) -> list[TestEntry]:
        return [e for e in self.entries if e.error]

    def submission_ids(self) -> list[str]:
        """The testset_ids a submission for this task must hold, each once, in list order."""
        return list(dict.fromkeys(e.testset_id for e in self.entries if e.testset_id is not None))


def select(entries: list[TestEntry], task: str) -> TaskSelection:
    if task not in SEED_TASKS:
        raise LarcqError(f"unknown task {task!r}; known: {', '.join(SEED_TASKS)}")
    seed_task = SEED_TASKS[task]
    others = set(KNOWN_TASKS) - {seed_task}
    mine = [e for e in entries if e.task not in others]
    return TaskSelection(task, seed_task, mine, len(entries) - len(mine))
