"""The index on its store (a local folder or any pyarrow filesystem URI): parts, a commit manifest, resume.

    <index>/meta.json                    what built it (model, chunking, sample rate, adapter, embedding dtype)
    <index>/chunks/part-<hex>.parquet    artifacts.INDEX_CHUNK_SCHEMA rows (audio_id, chunk_index, start_s,
                                         end_s, embedding; chunk_index -1: the whole file), sorted by
                                         (audio_id, chunk_index). Written by writer tasks on the workers
                                         (index/writer.py), never by the driver. A part holds many files;
                                         a long file's chunks may span several parts.
    <index>/files/part-NNNNNN.parquet    the commit manifest, written by the driver: one row per file and
                                         commit (artifacts.INDEX_FILE_SCHEMA): status (ok / failed /
                                         deleted), error, warning, size, mtime, and `chunk_parts`, the
                                         chunk parts that hold this file's chunks.

A file is visible only through its current files row (the newest part's; a changed file indexed
again, a failed one retried or a deleted one marked `deleted` supersede older rows), and its chunks
are read only from the parts that row names. So a file appears once all its chunks are written
(also a three-hour file whose chunks came in many batches), a crash leaves at most chunk parts
nobody names (removed by the next writer), and a row that a retried task wrote twice is never read.
A files part is one object: renamed into place on local disks, one PUT on object stores.

Indexes written before the manifest named chunk parts (files/part-N beside chunks/part-N, no
`chunk_parts` column) read as if each row named its part's twin.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from larcq_ray.artifacts import INDEX_CHUNK_SCHEMA, INDEX_FILE_SCHEMA
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.storage import Location, open_location

# Settings that change embeddings: resuming with different ones would mix two models in one index.
META_KEYS = ("model", "sample_rate", "chunking", "whole_file", "fusion_seed", "dtype", "adapter", "embedding_dtype")
# Failures that can go away without the file changing (it appears, permissions, a bug fixed, a
# worker out of memory, a store that was briefly unreachable): retried on every run. The others
# (empty, corrupt, invalid samples...) are retried only when the file's size or modification time
# changes. "silent": earlier versions failed silent files; silence is indexed now (with a warning),
# so those rows are retried once and then ok.
RETRY_KINDS = ("missing", "unreadable", "internal", "decode", "embed", "write", "silent")
UNKNOWN = -1  # size / mtime of files indexed before they were recorded, or that cannot be stat'ed
EMBEDDING_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
CHUNK_PARTS = pa.field("chunk_parts", pa.list_(pa.string()))
FILES_SCHEMA = INDEX_FILE_SCHEMA.append(CHUNK_PARTS)  # what a files part holds


@dataclass
class AudioEmbeddings:
    """The index in memory, as search scores it."""

    audio_ids: list[str]  # A audios
    chunk_emb: np.ndarray  # (C, D) float32 (float16 if loaded keep_half); chunks of audio a are rows chunk_offsets[a]:chunk_offsets[a+1]
    chunk_offsets: np.ndarray  # (A+1,) int64, starts at 0, every audio has >= 1 chunk
    whole_emb: np.ndarray | None  # (A, D) one whole-file embedding per audio; None if the index has none


def file_stat(path: str) -> tuple[int, int]:
    """(size in bytes, mtime in ns), or UNKNOWN for both when the file cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return UNKNOWN, UNKNOWN
    return int(st.st_size), int(st.st_mtime_ns)


def index_root(cfg) -> str:
    """Where cfg's index lives: `index.location` when set, else <run_dir>/index (a path or a URI)."""
    loc = getattr(cfg.index, "location", None)
    if loc:
        return str(loc)
    run_dir = str(cfg.run_dir)
    if "://" not in run_dir:
        return str(Path(run_dir) / "index")
    base, q, query = run_dir.partition("?")  # s3://bucket/run?endpoint_override=...: the path before the query
    return base.rstrip("/") + "/index" + q + query


def chunk_schema(embedding_dtype: str = "float32") -> pa.Schema:
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise LarcqError(f"index.embedding_dtype {embedding_dtype!r}: valid are {sorted(EMBEDDING_DTYPES)}")
    i = INDEX_CHUNK_SCHEMA.get_field_index("embedding")
    return INDEX_CHUNK_SCHEMA.set(i, pa.field("embedding", pa.list_(EMBEDDING_DTYPES[embedding_dtype])))


def _part_number(name: str) -> int:
    return int(name[5:-8])


class IndexStore:
    def __init__(self, root: str | Path):
        self.uri = str(root)
        self.location: Location = open_location(self.uri)
        self.local = isinstance(self.location.fs, pafs.LocalFileSystem)
        # Local paths, for callers and tests that look at the folder (None on object stores).
        self.root = Path(self.location.base) if self.local else None
        self.chunks_dir = self.root / "chunks" if self.local else None
        self.files_dir = self.root / "files" if self.local else None
        self._meta: Optional[dict] = None

    def __repr__(self) -> str:
        return f"IndexStore({self.uri!r})"

    # -- low level ---------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return self.location.path(*parts)

    def _names(self, sub: str) -> list[str]:
        fs, d = self.location.fs, self._path(sub)
        if fs.get_file_info(d).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(d, recursive=False))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File
                      and i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))

    def _write_table(self, sub: str, name: str, table: pa.Table) -> None:
        """One whole object: on local disks a temp file renamed into place, on object stores one PUT."""
        fs, target = self.location.fs, self._path(sub, name)
        fs.create_dir(self._path(sub), recursive=True)
        if self.local:
            tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
            pq.write_table(table, tmp, filesystem=fs)
            fs.move(tmp, target)
        else:
            pq.write_table(table, target, filesystem=fs)

    def _read_table(self, sub: str, name: str, columns=None) -> pa.Table:
        return pq.read_table(self._path(sub, name), filesystem=self.location.fs, columns=columns)

    # -- writing ---------------------------------------------------------------------------
    def open_for_write(self, meta: dict) -> None:
        """Create the index, or check that an existing one was built with the same settings;
        then remove what a killed run left behind (chunk parts no manifest row names)."""
        meta = {"embedding_dtype": "float32", **meta}
        chunk_schema(meta["embedding_dtype"])  # a clear error for an unknown dtype
        if self.exists():
            old = {"embedding_dtype": "float32", **self.meta()}  # indexes from before the setting: float32
            diff = {k: (old.get(k), meta.get(k)) for k in META_KEYS if old.get(k) != meta.get(k)}
            if diff:
                lines = "; ".join(f"{k}: index has {a!r}, config has {b!r}" for k, (a, b) in diff.items())
                raise LarcqError(
                    f"the index in {self.uri} was built with other settings ({lines}); "
                    "use another run_dir or delete the old index"
                )
        else:
            self.location.write_bytes("meta.json", json.dumps(meta, indent=2).encode())
            self._meta = meta
        self.remove_orphans()

    def remove_orphans(self) -> list[str]:
        """Delete chunk parts that no files row names (a killed run's), and local temp files."""
        named = self.referenced_parts()
        gone = [n for n in self._names("chunks") if n not in named]
        for n in gone:
            self.location.fs.delete_file(self._path("chunks", n))
        if self.local:
            for d in (self.chunks_dir, self.files_dir):
                if d.is_dir():
                    for tmp in d.glob("*.tmp"):
                        tmp.unlink()
        return gone

    def _next_part(self) -> str:
        nums = [_part_number(n) for n in self._names("files")]
        return f"part-{(max(nums) + 1 if nums else 0):06d}.parquet"

    def embedding_dtype(self) -> str:
        return self.meta().get("embedding_dtype", "float32") if self.exists() else "float32"

    def write_chunk_part(self, table: pa.Table) -> str:
        """One chunks part (a fresh name; sorted by audio_id, chunk_index), as the index's embedding dtype."""
        name = f"part-{uuid.uuid4().hex}.parquet"
        table = table.select(INDEX_CHUNK_SCHEMA.names).cast(chunk_schema(self.embedding_dtype()))
        table = table.sort_by([("audio_id", "ascending"), ("chunk_index", "ascending")])
        self._write_table("chunks", name, table)
        return name

    def commit(self, files: list[dict], chunks: Optional[list[dict]] = None) -> None:
        """Commit file rows (each naming its `chunk_parts`) as one files part: the commit mark.
        `chunks` (rows with embeddings), when given, are written first as one chunks part that the
        ok rows without `chunk_parts` name (for small writers and tests)."""
        if not files:
            return
        part = None
        if chunks:
            part = self.write_chunk_part(pa.Table.from_pylist(
                chunks, schema=INDEX_CHUNK_SCHEMA))
        rows = []
        for f in files:
            f = {"size_bytes": UNKNOWN, "mtime_ns": UNKNOWN, "error": "", "warning": "", **f}
            if "chunk_parts" not in f:
                f["chunk_parts"] = [part] if part and f.get("status") == "ok" else []
            rows.append(f)
        self._write_table("files", self._next_part(), pa.Table.from_pylist(rows, schema=FILES_SCHEMA))

    def mark_deleted(self, audio_ids: list[str]) -> None:
        """Files that left the corpus: a part that supersedes their rows, so search no longer sees them."""
        self.commit([{"audio_id": a, "duration_s": 0.0, "sample_rate": 0, "channels": 0, "n_chunks": 0,
                      "status": "deleted", "error": "", "warning": "", "chunk_parts": []} for a in audio_ids])

    # -- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.location.exists("meta.json")

    def meta(self) -> dict:
        if self._meta is None:
            if not self.exists():
                raise LarcqError(f"no index in {self.uri}: run `larcq-ray index` first")
            self._meta = json.loads(self.location.read_bytes("meta.json"))
        return self._meta

    def _files_parts(self) -> pa.Table:
        """Every files part's rows, with `part` (its number) and `chunk_parts` filled for old parts."""
        tables = []
        for name in self._names("files"):
            t = self._read_table("files", name)
            n = t.num_rows
            for f in INDEX_FILE_SCHEMA:  # parts written before a column existed
                if f.name not in t.column_names:
                    t = t.append_column(f.name, pa.array([UNKNOWN] * n, type=f.type))
            if "chunk_parts" not in t.column_names:  # the old layout: chunks/part-N beside files/part-N
                ok = pc.equal(t.column("status"), "ok").to_pylist()
                t = t.append_column(CHUNK_PARTS, pa.array([[name] if o else [] for o in ok], type=CHUNK_PARTS.type))
            t = t.select(FILES_SCHEMA.names).cast(FILES_SCHEMA)
            tables.append(t.append_column("part", pa.array([_part_number(name)] * n, type=pa.int64())))
        if not tables:
            empty = FILES_SCHEMA.empty_table()
            return empty.append_column("part", pa.array([], type=pa.int64()))
        return pa.concat_tables(tables)

    def referenced_parts(self) -> set[str]:
        t = self._files_parts()
        return set(pc.list_flatten(t.column("chunk_parts")).to_pylist()) if t.num_rows else set()

    def current_files(self) -> pa.Table:
        """Each file's current row (the newest part's), files marked deleted left out; sorted by audio_id,
        with `chunk_parts` and `part`."""
        t = self._files_parts()
        if t.num_rows == 0:
            return t
        # By id, newest part first; then each id's first row (columnar: the driver stays small at 10M files).
        t = t.take(pc.sort_indices(t, [("audio_id", "ascending"), ("part", "descending")]))
        ids = t.column("audio_id").combine_chunks()
        if len(ids) > 1:
            first = pa.concat_arrays([pa.array([True]), pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))])
            t = t.filter(first)
        return t.filter(pc.not_equal(t.column("status"), "deleted"))

    def ok_files(self) -> pa.Table:
        files = self.current_files()
        return files.filter(pc.equal(files.column("status"), "ok"))

    def read_files(self) -> pa.Table:
        return self.current_files().drop_columns(["part", "chunk_parts"])

    def read_chunks_of(self, files: pa.Table, columns: Optional[Iterable[str]] = None,
                       keep_half: bool = False) -> pa.Table:
        """The chunk rows of exactly `files` (rows of current_files), read part by part from the parts
        they name; a (audio_id, chunk_index) seen twice is kept once; embeddings as float32, or as
        stored when keep_half and the index is float16."""
        cols = list(columns or INDEX_CHUNK_SCHEMA.names)
        need = list(dict.fromkeys(cols + ["audio_id", "chunk_index"]))
        want: dict[str, set[str]] = {}
        for a, parts in zip(files.column("audio_id").to_pylist(), files.column("chunk_parts").to_pylist()):
            for p in parts or ():
                want.setdefault(p, set()).add(a)
        schema = chunk_schema(self.embedding_dtype()) if keep_half else INDEX_CHUNK_SCHEMA
        out_schema = pa.schema([schema.field(c) for c in need])
        tables = []
        for name in sorted(want):
            t = self._read_table("chunks", name, columns=need)
            mask = pc.is_in(t.column("audio_id"), value_set=pa.array(sorted(want[name]), type=pa.string()))
            if not pc.all(mask).as_py():  # a part wanted whole (the usual case) is not copied
                t = t.filter(mask)
            tables.append(t.cast(out_schema))
        if not tables:
            return out_schema.empty_table().select(cols)
        t = pa.concat_tables(tables)
        del tables  # the parts are freed once sorted below: one copy of the rows at a time
        if len(want) > 1:  # a row written twice (two parts) is read once
            t = _take_rows(t, pc.sort_indices(t, [("audio_id", "ascending"), ("chunk_index", "ascending")]))
            a = t.column("audio_id").to_numpy(zero_copy_only=False)
            c = t.column("chunk_index").to_numpy()
            dup = np.zeros(len(a), dtype=bool)
            if len(a) > 1:
                dup[1:] = (a[1:] == a[:-1]) & (c[1:] == c[:-1])
            if dup.any():
                t = t.filter(pa.array(~dup))
        return t.select(cols)

    def read_chunks(self, columns: Optional[Iterable[str]] = None) -> pa.Table:
        """The chunks of every file whose current row is ok."""
        return self.read_chunks_of(self.ok_files(), columns)

    def recorded_ids(self) -> set[str]:
        return set(self.current_files().column("audio_id").to_pylist())

    def load_embeddings(self, files: Optional[pa.Table] = None, keep_half: bool = False) -> AudioEmbeddings:
        """The audios of `files` (default: every ok file), sorted by id, chunks in order; whole-file rows
        become whole_emb. keep_half: a float16 index stays float16 in memory (half the bytes; the scorer
        widens each block to float32 as it uses it, so scores are the same)."""
        files = self.ok_files() if files is None else files
        table = self.read_chunks_of(files, keep_half=keep_half)
        if table.num_rows == 0:
            raise LarcqError(f"the index in {self.uri} holds no embeddings (every file failed?)")
        return embeddings_from_table(table)


def _take_rows(t: pa.Table, order: pa.Array) -> pa.Table:
    """t.take(order), the embedding column gathered through numpy into one preallocated matrix.
    Arrow's take of a chunked list column makes several copies (a 5 GB peak and 11 s for a 1 GB
    column of 1M chunks); this holds the column twice at most."""
    if "embedding" not in t.column_names or t.num_rows == 0:
        return t.take(order)
    col = t.column("embedding")
    lengths = pc.min_max(pc.list_value_length(col)).as_py()
    dim = lengths["min"]
    if not dim or lengths["max"] != dim:  # not one width: Arrow's take
        return t.take(order)
    idx = order.to_numpy()
    dest = np.empty(len(idx), dtype=np.int64)
    dest[idx] = np.arange(len(idx))  # where each row goes
    out = np.empty((t.num_rows, dim), dtype=col.type.value_type.to_pandas_dtype())
    start = 0
    for chunk in col.chunks:
        if len(chunk):
            out[dest[start:start + len(chunk)]] = pc.list_flatten(chunk).to_numpy(zero_copy_only=False).reshape(-1, dim)
        start += len(chunk)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), dim).cast(col.type)
    rest = t.drop_columns(["embedding"]).take(order)
    return rest.append_column(t.schema.field("embedding"), emb).select(t.column_names)


def embeddings_from_table(table: pa.Table) -> AudioEmbeddings:
    """Chunk rows (audio_id, chunk_index, embedding) -> AudioEmbeddings (see IndexStore.load_embeddings)."""
    ids = table.column("audio_id").to_numpy(zero_copy_only=False)
    cidx = table.column("chunk_index").to_numpy()
    col = table.column("embedding")
    emb_col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # combine_chunks copies even one
    half = pa.types.is_float16(emb_col.type.value_type)  # kept half (load_embeddings(keep_half=True))
    emb = np.asarray(pc.list_flatten(emb_col).to_numpy(zero_copy_only=False), dtype=np.float16 if half else np.float32)
    emb = emb.reshape(table.num_rows, -1)
    n = len(ids)
    # read_chunks_of's rows come sorted: then no reordered copy of the embeddings is made
    in_order = n < 2 or bool(np.all((ids[1:] > ids[:-1]) | ((ids[1:] == ids[:-1]) & (cidx[1:] > cidx[:-1]))))
    if not in_order:
        order = np.lexsort((cidx, ids))
        ids, cidx, emb = ids[order], cidx[order], emb[order]
    first = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]])) if n else np.zeros(0, np.int64)
    audio_ids = ids[first]
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
        chunk_emb=emb if keep.all() else np.ascontiguousarray(emb[keep]),
        chunk_offsets=offsets,
        whole_emb=whole_emb,
    )
