"""The index's writer stage: embeddings go from the actor pool straight to the store, on the workers.

    DecodeChunkStage (tasks) -> ClapEmbedStage (actors) -> IndexWriteStage (tasks) -> driver

A writer task gets a batch of embedded rows (several files, or a slice of a long file), writes the
ok rows as one chunks part (IndexStore.write_chunk_part: a fresh name, one object) and returns one
small status row per file in the batch: how many of the file's rows it carried (`n_got`), the part
that holds them, and the file's status and error. The driver adds up `n_got` per file and commits
a file (its manifest row naming every part that holds its chunks) once all `n_rows` arrived, so
embeddings never travel to the driver and a file is visible only when all its chunks are written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from larcq_ray.core.stage import Batch, Resources

# What the driver gets per (file, batch): no embeddings, no features.
STATUS_COLUMNS = ("audio_id", "n_rows", "n_got", "part", "status", "error", "warning", "duration_s",
                  "sample_rate", "channels", "n_chunks")


@dataclass
class IndexWriteStage:
    index_uri: str  # the index root (a path or a URI): workers open the store themselves
    # Writing is I/O and takes no CPU slot: with any slot (even 0.25 CPU), decode tasks that fill every
    # free CPU kept the writers waiting until all decoding was done, so nothing was committed until the
    # end (3,000 files: first commit at 49.9 s of 50.5 s; with no slot, 22.5 s of 53.6 s). At most
    # `tasks` write at once.
    cpus: float = 0.0
    tasks: int = 4
    name: str = "write"

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, tasks=self.tasks)

    def setup(self) -> None:
        from larcq_ray.index.store import IndexStore

        self._store = IndexStore(self.index_uri)

    def process_batch(self, batch: Batch) -> Batch:
        status = np.asarray(batch["status"], dtype=object)
        ok = np.flatnonzero(status == "ok")
        part = ""
        if len(ok):
            emb = np.stack([np.frombuffer(batch["embedding"][i], dtype=np.float32) for i in ok])
            dim = emb.shape[1]
            table = pa.table({
                "audio_id": pa.array([str(batch["audio_id"][i]) for i in ok], type=pa.string()),
                "chunk_index": pa.array(np.asarray(batch["chunk_index"])[ok].astype(np.int32)),
                "start_s": pa.array(np.asarray(batch["start_s"], dtype=np.float64)[ok]),
                "end_s": pa.array(np.asarray(batch["end_s"], dtype=np.float64)[ok]),
                "embedding": pa.ListArray.from_arrays(
                    pa.array(np.arange(0, (len(ok) + 1) * dim, dim, dtype=np.int32)),
                    pa.array(emb.reshape(-1))),
            })
            part = self._store.write_chunk_part(table)
        return _status_rows(batch, part, None)

    def failed_batch(self, batch: Batch, reason: str) -> Batch:
        return _status_rows(batch, "", reason)


def _status_rows(batch: Batch, part: str, reason: str | None) -> Batch:
    """One row per file of `batch`: how many of its rows came, where they are, the first error."""
    ids = [str(a) for a in batch["audio_id"]]
    status = [str(s) for s in batch["status"]]
    error = [str(e) for e in batch["error"]]
    first: dict[str, int] = {}
    got: dict[str, int] = {}
    bad: dict[str, str] = {}
    for i, a in enumerate(ids):
        first.setdefault(a, i)
        got[a] = got.get(a, 0) + 1
        if reason is not None and status[i] == "ok":
            bad.setdefault(a, reason)
        elif status[i] != "ok":
            bad.setdefault(a, error[i])
    order = list(first)
    rows = [first[a] for a in order]

    def col(name, dtype=None):
        v = np.asarray(batch[name])[rows]
        return v.astype(dtype) if dtype is not None else v

    return {
        "audio_id": np.asarray(order, dtype=object),
        "n_rows": col("n_rows", np.int64),
        "n_got": np.asarray([got[a] for a in order], dtype=np.int64),
        "part": np.asarray([part if a not in bad else "" for a in order], dtype=object),
        "status": np.asarray(["failed" if a in bad else "ok" for a in order], dtype=object),
        "error": np.asarray([bad.get(a, "") for a in order], dtype=object),
        "warning": np.asarray([str(w) for w in col("warning")], dtype=object),
        "duration_s": col("duration_s", np.float64),
        "sample_rate": col("sample_rate", np.int64),
        "channels": col("channels", np.int64),
        "n_chunks": col("n_chunks", np.int64),
    }
