"""The Parquet index on disk: committed parts, resume, and loading for search.

    <run_dir>/index/meta.json              what built it (model, chunking, sample rate, adapter)
    <run_dir>/index/chunks/part-N.parquet  artifacts.INDEX_CHUNK_SCHEMA: audio_id, chunk_index, start_s,
                                           end_s, embedding (chunk_index -1: the whole file)
    <run_dir>/index/files/part-N.parquet   artifacts.INDEX_FILE_SCHEMA: one row per file and commit:
                                           status (ok / failed / deleted), error, warning, size, mtime

The parts are a log. A part is committed when its files part exists (written last, by rename), so
a crash leaves at most an orphan chunks part, removed on the next run: every file is either fully
indexed with all its chunks, or not at all. A later part's row for a file supersedes earlier ones
(a changed file indexed again, a failed one retried, a deleted one marked `deleted`), and a file's
chunks are read from the part that holds its current row only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from larcq_ray.artifacts import INDEX_CHUNK_SCHEMA, INDEX_FILE_SCHEMA
from larcq_ray.core.errors import LarcqError

# Settings that change embeddings: resuming with different ones would mix two models in one index.
META_KEYS = ("model", "sample_rate", "chunking", "whole_file", "fusion_seed", "dtype", "adapter")
# Failures that can go away without the file changing (it appears, permissions, a bug fixed, a
# worker out of memory): retried on every run. The others (empty, corrupt, invalid samples...) are
# retried only when the file's size or modification time changes. "silent": earlier versions failed
# silent files; silence is indexed now (with a warning), so those rows are retried once and then ok.
RETRY_KINDS = ("missing", "unreadable", "internal", "decode", "embed", "silent")
UNKNOWN = -1  # size / mtime of files indexed before they were recorded, or that cannot be stat'ed


@dataclass
class AudioEmbeddings:
    """The index in memory, as search scores it."""

    audio_ids: list[str]  # A audios
    chunk_emb: np.ndarray  # (C, D) float32; chunks of audio a are rows chunk_offsets[a]:chunk_offsets[a+1]
    chunk_offsets: np.ndarray  # (A+1,) int64, starts at 0, every audio has >= 1 chunk
    whole_emb: np.ndarray | None  # (A, D) one whole-file embedding per audio; None if the index has none


def file_stat(path: str) -> tuple[int, int]:
    """(size in bytes, mtime in ns), or UNKNOWN for both when the file cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return UNKNOWN, UNKNOWN
    return int(st.st_size), int(st.st_mtime_ns)


class IndexStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.files_dir = self.root / "files"

    # -- writing ---------------------------------------------------------------------------
    def open_for_write(self, meta: dict) -> None:
        """Create the index, or check that an existing one was built with the same settings."""
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / "meta.json"
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            diff = {k: (old.get(k), meta.get(k)) for k in META_KEYS if old.get(k) != meta.get(k)}
            if diff:
                lines = "; ".join(f"{k}: index has {a!r}, config has {b!r}" for k, (a, b) in diff.items())
                raise LarcqError(
                    f"the index in {self.root} was built with other settings ({lines}); "
                    "use another run_dir or delete the old index"
                )
        else:
            meta_path.write_text(json.dumps(meta, indent=2))
        self._remove_orphans()

    def _part_names(self, d: Path) -> set[str]:
        return {p.name for p in d.glob("part-*.parquet")} if d.is_dir() else set()

    def _remove_orphans(self) -> None:
        committed = self._part_names(self.files_dir)
        for name in self._part_names(self.chunks_dir) - committed:
            (self.chunks_dir / name).unlink()
        for d in (self.chunks_dir, self.files_dir):
            for tmp in d.glob("*.tmp"):
                tmp.unlink()

    def _next_part(self) -> str:
        nums = [int(n[5:-8]) for n in self._part_names(self.files_dir) | self._part_names(self.chunks_dir)]
        return f"part-{(max(nums) + 1 if nums else 0):06d}.parquet"

    def commit(self, files: list[dict], chunks: list[dict]) -> None:
        if not files:
            return
        name = self._next_part()
        files = [{"size_bytes": UNKNOWN, "mtime_ns": UNKNOWN, **f} for f in files]
        ftab = pa.Table.from_pylist(files, schema=INDEX_FILE_SCHEMA)
        ctab = pa.Table.from_pylist(chunks, schema=INDEX_CHUNK_SCHEMA)
        for table, d in ((ctab, self.chunks_dir), (ftab, self.files_dir)):  # files last: the commit mark
            tmp = d / (name + ".tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, d / name)

    def mark_deleted(self, audio_ids: list[str]) -> None:
        """Files that left the corpus: a part that supersedes their rows, so search no longer sees them."""
        self.commit([{"audio_id": a, "duration_s": 0.0, "sample_rate": 0, "channels": 0, "n_chunks": 0,
                      "status": "deleted", "error": "", "warning": ""} for a in audio_ids], [])

    # -- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.root / "meta.json").is_file()

    def meta(self) -> dict:
        if not self.exists():
            raise LarcqError(f"no index in {self.root}: run `larcq-ray index` first")
        return json.loads((self.root / "meta.json").read_text())

    def _read_parts(self, d: Path, schema: pa.Schema, columns=None) -> pa.Table:
        """Every committed part of `d`, with the part number as column `part`."""
        cols = columns or schema.names
        tables = []
        for name in sorted(self._part_names(self.files_dir)):
            if not (d / name).exists():
                continue
            t = pq.read_table(d / name)
            for f in schema:  # parts written before a column existed
                if f.name in cols and f.name not in t.column_names:
                    t = t.append_column(f.name, pa.array([UNKNOWN] * t.num_rows, type=f.type))
            t = t.select(cols).cast(pa.schema([schema.field(c) for c in cols]))
            tables.append(t.append_column("part", pa.array([int(name[5:-8])] * t.num_rows, type=pa.int64())))
        if not tables:
            empty = pa.schema([schema.field(c) for c in cols]).empty_table()
            return empty.append_column("part", pa.array([], type=pa.int64()))
        return pa.concat_tables(tables)

    def current_files(self) -> pa.Table:
        """Each file's current row (the newest part's), files marked deleted left out; with `part`."""
        t = self._read_parts(self.files_dir, INDEX_FILE_SCHEMA)
        if t.num_rows == 0:
            return t
        # Newest part first, then keep each audio_id's first row.
        t = t.take(pc.sort_indices(t, [("part", "descending")]))
        ids = t.column("audio_id").to_pylist()
        seen: set[str] = set()
        keep = []
        for i, a in enumerate(ids):
            if a not in seen:
                seen.add(a)
                keep.append(i)
        t = t.take(pa.array(keep, type=pa.int64()))
        t = t.filter(pc.not_equal(t.column("status"), "deleted"))
        return t.take(pc.sort_indices(t, [("audio_id", "ascending")]))

    def read_files(self) -> pa.Table:
        return self.current_files().drop_columns(["part"])

    def read_chunks(self, columns=None) -> pa.Table:
        """The chunks of every file whose current row is ok, from that row's part only."""
        files = self.current_files()
        ok = files.filter(pc.equal(files.column("status"), "ok"))
        want = {(a, p) for a, p in zip(ok.column("audio_id").to_pylist(), ok.column("part").to_pylist())}
        cols = list(columns or INDEX_CHUNK_SCHEMA.names)
        need = list(dict.fromkeys(cols + ["audio_id"]))
        t = self._read_parts(self.chunks_dir, INDEX_CHUNK_SCHEMA, need)
        mask = [(a, p) in want for a, p in zip(t.column("audio_id").to_pylist(), t.column("part").to_pylist())]
        return t.filter(pa.array(mask, type=pa.bool_())).select(cols)

    def recorded_ids(self) -> set[str]:
        return set(self.current_files().column("audio_id").to_pylist())

    def load_embeddings(self) -> AudioEmbeddings:
        """All indexed audios, sorted by id, chunks in order; whole-file rows become whole_emb."""
        table = self.read_chunks()
        if table.num_rows == 0:
            raise LarcqError(f"the index in {self.root} holds no embeddings (every file failed?)")
        ids = table.column("audio_id").to_numpy(zero_copy_only=False)
        cidx = table.column("chunk_index").to_numpy()
        emb = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(), dtype=np.float32)
        emb = emb.reshape(table.num_rows, -1)
        order = np.lexsort((cidx, ids))
        ids, cidx, emb = ids[order], cidx[order], emb[order]
        audio_ids, first = np.unique(ids, return_index=True)
        whole_mask = cidx == -1
        has_whole = np.add.reduceat(whole_mask.astype(np.int64), first) > 0
        whole_emb = None
        if has_whole.all():
            whole_emb = emb[whole_mask]  # one per audio, in audio order (lexsort puts -1 first)
        # Chunks: rows >= 0; an audio indexed only as a whole file uses that as its one chunk.
        n_chunk_rows = np.add.reduceat((~whole_mask).astype(np.int64), first)
        keep = ~whole_mask
        lone = np.zeros(len(ids), dtype=bool)
        lone[first[n_chunk_rows == 0]] = True
        keep |= lone
        counts = np.add.reduceat(keep.astype(np.int64), first)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return AudioEmbeddings(
            audio_ids=[str(a) for a in audio_ids],
            chunk_emb=np.ascontiguousarray(emb[keep]),
            chunk_offsets=offsets,
            whole_emb=whole_emb,
        )
