"""The Parquet index on disk: committed parts, resume, and loading for search.

    <run_dir>/index/meta.json            what built it (model, chunking, sample rate, dim)
    <run_dir>/index/chunks/part-N.parquet  audio_id, chunk_index, start_s, end_s, embedding
    <run_dir>/index/files/part-N.parquet   audio_id, duration_s, sample_rate, channels, n_chunks,
                                          status, error, warning

chunk_index -1 is the whole-file embedding. A part is committed when its files part exists
(written last, by rename), so a crash leaves at most an orphan chunks part, which is removed
on the next run: every file is either fully indexed with all its chunks, or not at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from larcq_ray.errors import LarcqError
from larcq_ray.scoring import AudioEmbeddings

CHUNK_SCHEMA = pa.schema(
    [
        ("audio_id", pa.string()),
        ("chunk_index", pa.int32()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("embedding", pa.list_(pa.float32())),
    ]
)
FILE_SCHEMA = pa.schema(
    [
        ("audio_id", pa.string()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int32()),
        ("n_chunks", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("warning", pa.string()),
    ]
)
# Settings that change embeddings: resuming with different ones would mix two indexes.
META_KEYS = ("model", "sample_rate", "chunking", "whole_file", "fusion_seed", "dtype")


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
        ftab = pa.Table.from_pylist(files, schema=FILE_SCHEMA)
        ctab = pa.Table.from_pylist(chunks, schema=CHUNK_SCHEMA)
        for table, d in ((ctab, self.chunks_dir), (ftab, self.files_dir)):  # files last: the commit mark
            tmp = d / (name + ".tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, d / name)

    # -- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.root / "meta.json").is_file()

    def meta(self) -> dict:
        if not self.exists():
            raise LarcqError(f"no index in {self.root}: run `larcq-ray index` first")
        return json.loads((self.root / "meta.json").read_text())

    def _read(self, d: Path, schema: pa.Schema, columns=None) -> pa.Table:
        committed = sorted(self._part_names(self.files_dir))
        paths = [d / n for n in committed if (d / n).exists()]
        if not paths:
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return pa.concat_tables([pq.read_table(p, columns=columns, schema=schema) for p in paths])

    def read_files(self) -> pa.Table:
        return self._read(self.files_dir, FILE_SCHEMA)

    def read_chunks(self, columns=None) -> pa.Table:
        return self._read(self.chunks_dir, CHUNK_SCHEMA, columns)

    def recorded_ids(self) -> set[str]:
        return set(self._read(self.files_dir, FILE_SCHEMA, ["audio_id"]).column("audio_id").to_pylist())

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
