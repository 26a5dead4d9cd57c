"""submission.csv, as seed 004's validator expects it: a header `testset_id,text`, one row per test
item of the task, lower-cased text. Written by eval-alm and checked by `validate-submission`.

The check is stricter than the seed's (which looks at the format only): every expected testset_id
exactly once, no id the test list does not hold for the task, no empty text, the right header. Each
problem is one line; a caller exits non-zero when there is any.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Optional

from larcq_ray.core.errors import LarcqError
from larcq_ray.evaluate.alm_config import SEED_TASKS
from larcq_ray.evaluate.alm_testlist import read_test_list, select

HEADER = ["testset_id", "text"]
_MAX_LINES_PER_KIND = 20  # one line per problem, but a broken file does not print 10,000 of them


def write_submission(path: str | Path, rows: list[tuple[str, str]]) -> Path:
    """(testset_id, text) rows -> `path`; text lower-cased, kept on one line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for tid, text in rows:
            w.writerow([tid, " ".join(str(text).split()).lower()])
    tmp.replace(path)
    return path


def _infer_task(ids: set[str], entries) -> Optional[str]:
    """The task whose entries most of the submission's ids belong to; None when none match or tied."""
    counts = {task: sum(1 for e in entries if e.testset_id in ids and e.task == seed)
              for task, seed in SEED_TASKS.items()}
    best = max(counts.values())
    winners = [t for t, n in counts.items() if n == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


def validate_submission(submission: str | Path, test_list: str | Path, task: Optional[str] = None,
                        audio_root: str | Path | None = None) -> tuple[list[str], str]:
    """(problems, the task checked). An unreadable test list or submission file is a LarcqError."""
    submission = Path(submission)
    entries = read_test_list(test_list, audio_root)
    if not submission.is_file():
        raise LarcqError(f"submission not found: {submission}")
    try:
        with open(submission, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise LarcqError(f"submission {submission} is not a readable UTF-8 CSV file ({e})") from None
    problems: list[str] = []
    if not lines:
        return [f"{submission}: the file is empty (expected the header {','.join(HEADER)})"], task or "?"
    header = [h.strip() for h in lines[0]]
    if header != HEADER:
        problems.append(f"header is {','.join(lines[0])!r}, expected {','.join(HEADER)!r}")
    rows = lines[1:]
    ids: list[str] = []
    per_kind: Counter = Counter()

    def add(kind: str, msg: str) -> None:
        per_kind[kind] += 1
        if per_kind[kind] <= _MAX_LINES_PER_KIND:
            problems.append(msg)

    for n, row in enumerate(rows, start=2):
        if not row:
            add("blank", f"line {n}: blank line")
            continue
        if len(row) != 2:
            add("fields", f"line {n}: {len(row)} fields, expected 2 (testset_id,text)")
            if not row[0].strip():
                continue
        tid = row[0].strip()
        ids.append(tid)
        text = row[1] if len(row) > 1 else ""
        if not text.strip():
            add("empty", f"line {n}: testset_id {tid!r} has an empty text")
    if task is None:
        task = _infer_task(set(ids), entries)
        if task is None:
            problems.append("cannot tell which task this submission is for (its ids match no task's entries, or "
                            "both equally); pass --task asr|aac")
            return problems, "?"
    expected = select(entries, task).submission_ids()
    expected_set = set(expected)
    for tid, k in Counter(ids).items():
        if k > 1:
            add("dup", f"testset_id {tid!r} appears {k} times (expected once)")
    for tid in dict.fromkeys(ids):
        if tid not in expected_set:
            add("unknown", f"testset_id {tid!r} is not a {SEED_TASKS[task]} entry of the test list")
    have = set(ids)
    for tid in expected:
        if tid not in have:
            add("missing", f"testset_id {tid!r} is missing")
    for kind, k in per_kind.items():
        if k > _MAX_LINES_PER_KIND:
            problems.append(f"... and {k - _MAX_LINES_PER_KIND} more problem(s) of the same kind as above")
    return problems, task
