"""The skeleton shared by the jobs that turn audio files into rows (index, caption).

    files -> Ray Data (a decode stage on CPU tasks | a model stage in an actor pool) -> driver

Each stage emits several rows per file (chunks, windows), every row carrying `audio_id` and
`n_rows` (how many rows its file has in all). map_batches does not keep order, so the driver
regroups rows by file; once a file is complete the job's `assemble` turns its rows into a
`FileResult`, and every `commit_every` files the job's `commit` writes them (a Parquet part), so
a re-run resumes from the last commit. A file whose rows never all arrive is an error, never a
silent loss.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from larcq_ray.core.errors import LarcqError


@dataclass
class FileResult:
    audio_id: str
    error: str = ""  # "" when the file is done; else "<kind>: <detail>"
    warnings: list[str] = field(default_factory=list)
    units: int = 0  # what the file produced (embeddings, window captions)
    payload: Any = None  # what the job commits for this file


def reason_kind(msg: str) -> str:
    """"unreadable: libsndfile says ..." -> "unreadable": what summaries count by."""
    return msg.split(":", 1)[0].strip() or "unknown"


@dataclass
class FileJobSummary:
    done_word: str  # "indexed", "captioned"
    units_text: str  # "embeddings written", "window captions written to X"
    done: int = 0
    failed: int = 0
    skipped: int = 0  # already done by an earlier run, same settings
    units: int = 0
    reasons: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)  # job-specific lines (files changed, dropped...)

    def add(self, r: FileResult) -> None:
        if r.error:
            self.failed += 1
            self.reasons[reason_kind(r.error)] += 1
        else:
            self.done += 1
            self.units += r.units
        for w in r.warnings:
            self.warnings[reason_kind(w)] += 1

    def lines(self) -> list[str]:
        out = [f"{self.done} {self.done_word}, {self.failed} failed"
               + (f", {self.skipped} already {self.done_word} (skipped)" if self.skipped else "")
               + f"; {self.units} {self.units_text}"]
        out += [f"  {n}" for n in self.notes]
        out += [f"  failed: {n} x {reason}" for reason, n in self.reasons.most_common()]
        out += [f"  warning: {n} x {w}" for w, n in self.warnings.most_common()]
        return out


def file_dataset(refs: Iterable, files_per_task: int):
    """One Ray Data row per file (audio_id, path), `files_per_task` files per block. Rejected corpus
    entries (AudioRef.reject) are the job's to record as failed before: they are never decoded."""
    import ray

    refs = list(refs)
    rejected = [r.audio_id for r in refs if getattr(r, "reject", "")]
    if rejected:
        raise ValueError(f"rejected corpus entries sent to decoding: {rejected[:5]}")
    rows = [{"audio_id": r.audio_id, "path": r.path} for r in refs]
    return ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // files_per_task)))


def collect_files(ds, n_files: int, *, assemble: Callable[[str, list[dict]], FileResult],
                  commit: Callable[[list[FileResult]], None], commit_every: int, summary: FileJobSummary,
                  desc: str, show_progress: bool, seen: Callable[[dict], None] | None = None) -> FileJobSummary:
    """Regroup the streamed rows by file, assemble each complete file, commit every `commit_every`.

    A row stands for `n_got` rows of its file when it has that column (a writer stage's status row:
    the rows themselves went to the store), else for one. `seen` is called with every batch the
    driver receives (tests check what reaches the driver)."""
    from tqdm import tqdm

    pending: dict[str, list[dict]] = defaultdict(list)
    arrived: dict[str, int] = defaultdict(int)  # rows of each file seen so far
    ready: list[FileResult] = []
    bar = tqdm(total=n_files, unit="file", desc=desc, disable=not show_progress)

    def flush() -> None:
        if ready:
            batch = list(ready)
            ready.clear()  # taken before committing: a failing commit is not retried by the final flush
            commit(batch)

    try:
        # prefetch_batches=0: with the default prefetch a finished block waits for the next one, and
        # the index's writer emits few, large blocks: on 2,000 files the first status row came at
        # 63 s of 63 s (the end) with prefetch, at 38 s of 54 s without.
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=0):
            if seen is not None:
                seen(batch)
            n = len(batch["audio_id"])
            for i in range(n):
                row = {k: batch[k][i] for k in batch}
                aid = str(row["audio_id"])
                pending[aid].append(row)
                arrived[aid] += int(row["n_got"]) if "n_got" in row else 1
                if arrived[aid] < int(row["n_rows"]):
                    continue
                del arrived[aid]
                result = assemble(aid, pending.pop(aid))
                summary.add(result)
                ready.append(result)
                bar.update(1)
                if len(ready) >= commit_every:
                    flush()
    finally:
        flush()  # what is complete is kept, also when the stream fails or is interrupted
        bar.close()
    if pending:  # would mean rows were lost in flight; never silently accept that
        raise LarcqError(f"{desc}: {len(pending)} file(s) came back incomplete: {sorted(pending)[:5]}")
    return summary
