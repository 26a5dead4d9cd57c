"""Approximate search: a FAISS index over every chunk embedding proposes candidate audios.

Stored beside the embeddings (a local path or any URI the index store reads):
    <index>/ann/<name>.faiss         faiss.write_index bytes (inner product on unit vectors)
    <index>/ann/<name>.rows.parquet  audio_id of each FAISS row, in row order
    <index>/ann/<name>.json          factory, dim, rows, the settings, and `files_fingerprint`: a hash of
                                     the ok files and the parts holding them; a different fingerprint
                                     means the index changed since the ANN was built (stale)

Built by a Ray job (`larcq-ray build-ann`, or on demand by search with search.method: ann):
one task trains the quantizers on a sample of chunks, one task per shard adds its chunks to a copy
of the trained index, and one task merges the shard indexes in shard order and writes the files.
The driver only passes references. A query's rows (the whole query and each query chunk) each
fetch their `candidates` nearest chunks; the audios of those chunks are the query's candidates,
which search then scores exactly with all their chunks (search/sharded.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from larcq_ray.core.errors import LarcqError
from larcq_ray.index.store import IndexStore

log = logging.getLogger(__name__)


_ADD_ROWS = 65536  # chunk rows added to a FAISS index at once


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise LarcqError("search.method: ann needs FAISS: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def files_fingerprint(files: pa.Table) -> str:
    """sha256 over the ok files' ids and the chunk parts that hold them: changes when any file's rows change."""
    h = hashlib.sha256()
    t = files.select(["audio_id", "chunk_parts"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t.combine_chunks())
    h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


def resolve_factory(factory: str, n_rows: int, dim: int) -> str:
    if factory != "auto":
        return factory
    if n_rows < 50_000:
        return "Flat"
    # about sqrt(rows) lists (FAISS's guide: 1-16 x sqrt): cheap to train on a CPU, and nprobe=32
    # of them reached recall@10 >= 0.95 after exact re-scoring in benchmarks/bench_scale.py
    nlist = int(2 ** round(math.log2(max(16.0, math.sqrt(n_rows)))))
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return f"IVF{nlist},PQ{m}"


def resolve_candidates(candidates: int | str, n_rows: int) -> int:
    """Chunks fetched a query row: `candidates`, or for auto about n_rows / 4096 as a power of two, at least
    256. The depth recall needs grows with the corpus when each event's audios do (bench_scale.py: 256
    kept recall@10 0.977 at 1M chunks and 0.503 at 10M, where 2,048 gave 0.968)."""
    if candidates != "auto":
        n = int(candidates)
        if n < 1:
            raise LarcqError(f"search.ann.candidates must be >= 1 or auto, got {candidates}")
        return n
    return max(256, int(2 ** round(math.log2(max(1.0, n_rows / 4096)))))


def _paths(name: str) -> tuple[str, str, str]:
    return f"ann/{name}.faiss", f"ann/{name}.rows.parquet", f"ann/{name}.json"


def _serialize(index) -> np.ndarray:
    return faiss_module().serialize_index(index)


def _deserialize(buf: np.ndarray):
    return faiss_module().deserialize_index(np.asarray(buf, dtype=np.uint8))


def _chunk_matrix(store: IndexStore, files: pa.Table, keep_half: bool = False) -> tuple[np.ndarray, pa.Array]:
    """The chunk embeddings that search scores (whole-file rows left out unless an audio has nothing
    else), float32 (float16 as stored with keep_half), and the audio_id of each row."""
    from larcq_ray.index.store import embeddings_from_table

    t = store.read_chunks_of(files, columns=["audio_id", "chunk_index", "embedding"], keep_half=keep_half)
    a = embeddings_from_table(t)
    del t
    ids = pa.array(np.repeat(np.asarray(a.audio_ids, dtype=object), np.diff(a.chunk_offsets)), type=pa.string())
    return (a.chunk_emb if keep_half else np.ascontiguousarray(a.chunk_emb, dtype=np.float32)), ids


def _add_rows(index, x: np.ndarray) -> None:
    """index.add in slices widened to float32: FAISS's working memory (assignments, residuals) and
    the float32 copy are per slice, so a shard's add takes about its stored size, not several times it."""
    for a in range(0, len(x), _ADD_ROWS):
        index.add(np.ascontiguousarray(x[a:a + _ADD_ROWS], dtype=np.float32))


def _train_task(uri: str, files: pa.Table, factory: str, sample: int, seed: int = 0):
    """Trained, empty index (serialized) from about `sample` chunks of a random subset of files."""
    faiss = faiss_module()
    store = IndexStore(uri)
    rng = np.random.default_rng(seed)
    n_chunks = np.maximum(files.column("n_chunks").to_numpy(zero_copy_only=False).astype(np.int64), 1)
    order = rng.permutation(files.num_rows)
    take = order[: max(1, int(np.searchsorted(np.cumsum(n_chunks[order]), sample)) + 1)]
    x, _ = _chunk_matrix(store, files.take(pa.array(np.sort(take))))
    if len(x) > sample:
        x = x[rng.choice(len(x), sample, replace=False)]
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(x)
    return _serialize(index)


def _add_task(uri: str, files: pa.Table, trained: np.ndarray):
    """One shard's chunks added to a copy of the trained index: (serialized index, audio_id per row)."""
    index = _deserialize(trained)
    x, ids = _chunk_matrix(IndexStore(uri), files, keep_half=True)
    _add_rows(index, x)
    return _serialize(index), ids


def _mergeable(faiss, index) -> bool:
    """IVF indexes merge shard parts; others (HNSW...) are built by adding every shard in one task."""
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return isinstance(index, faiss.IndexFlatCodes)


def _merge_task(uri: str, name: str, parts: list, meta: dict, trained=None, shard_files=None) -> dict:
    """Shard indexes (refs of _add_task results) -> one index in shard order; or, for a factory
    that cannot merge, `trained` filled shard by shard here. Writes .faiss, .rows.parquet and
    .json (last: the commit)."""
    import ray

    faiss = faiss_module()
    from larcq_ray.core.storage import open_location

    index, ids = None, []
    if shard_files is not None:
        index = _deserialize(trained)
        for files in shard_files:
            x, part_ids = _chunk_matrix(IndexStore(uri), files, keep_half=True)
            _add_rows(index, x)
            ids.append(part_ids)
            del x
    for ref in parts:
        buf, part_ids = ray.get(ref)
        part = _deserialize(buf)
        del buf
        if index is None:
            index = part
        else:  # IVF: ids shift by the rows so far; flat codes: rows append
            index.merge_from(part, index.ntotal if not isinstance(index, faiss.IndexFlatCodes) else 0)
        ids.append(part_ids)
    loc = open_location(uri)
    faiss_path, rows_path, meta_path = _paths(name)
    loc.write_bytes(faiss_path, faiss.serialize_index(index).tobytes())
    sink = io.BytesIO()
    pq.write_table(pa.table({"audio_id": pa.chunked_array(ids, type=pa.string())}), sink)
    loc.write_bytes(rows_path, sink.getvalue())
    meta = {**meta, "n_rows": int(index.ntotal)}
    loc.write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return meta


def build_ann(index_uri: str, ann_cfg, shard_chunks: int = 2_000_000, num_cpus: float = 1.0) -> dict:
    """Build the ANN index of `index_uri` with Ray tasks; returns its meta (with build_s)."""
    import ray

    from larcq_ray.search.sharded import ray_get
    from larcq_ray.search.shards import plan_shards

    faiss_module()
    t0 = time.perf_counter()
    store = IndexStore(index_uri)
    files = store.ok_files()
    if files.num_rows == 0:
        raise LarcqError(f"the index in {index_uri} holds no embeddings: nothing to build an ANN index of")
    n_rows = int(np.maximum(files.column("n_chunks").to_numpy(zero_copy_only=False), 1).sum())
    shards = plan_shards(files, shard_chunks)
    train = ray.remote(_train_task).options(num_cpus=num_cpus)
    # dim: from one file's chunks (a small read)
    dim = int(len(store.read_chunks_of(files.slice(0, 1), columns=["embedding"]).column("embedding")[0]))
    factory = resolve_factory(ann_cfg.factory, n_rows, dim)
    trained = train.remote(index_uri, files, factory, int(ann_cfg.train_sample))
    probe = faiss_module().index_factory(dim, factory, faiss_module().METRIC_INNER_PRODUCT)
    mergeable = _mergeable(faiss_module(), probe)
    add = ray.remote(_add_task).options(num_cpus=num_cpus)
    parts = [add.remote(index_uri, s.files, trained) for s in shards] if mergeable else []
    meta = {"factory": factory, "dim": dim, "metric": "inner_product", "name": ann_cfg.name,
            "train_sample": int(ann_cfg.train_sample), "n_shards": len(shards),
            "files_fingerprint": files_fingerprint(files), "faiss_version": faiss_module().__version__}
    merge = ray.remote(_merge_task).options(num_cpus=num_cpus)
    # refs in a list: the merge task gets them, not their bytes through the driver
    meta = ray_get(merge.remote(index_uri, ann_cfg.name, parts, meta, None if mergeable else trained,
                                None if mergeable else [s.files for s in shards]))
    meta["build_s"] = round(time.perf_counter() - t0, 3)
    log.info("built ANN index %s (%s, %d rows) in %.1f s", ann_cfg.name, factory, meta["n_rows"], meta["build_s"])
    return meta


def ann_state(store: IndexStore, name: str, files: pa.Table) -> tuple[str, dict | None]:
    """("ok" | "missing" | "stale", meta)."""
    _, _, meta_path = _paths(name)
    if not store.location.exists(meta_path):
        return "missing", None
    meta = json.loads(store.location.read_bytes(meta_path))
    if meta.get("files_fingerprint") != files_fingerprint(files):
        return "stale", meta
    return "ok", meta


def ensure_ann(index_uri: str, ann_cfg, files: pa.Table, shard_chunks: int, num_cpus: float = 1.0) -> dict:
    """The meta of an up-to-date ANN index: built when missing or stale if build_on_demand, else a LarcqError."""
    state, meta = ann_state(IndexStore(index_uri), ann_cfg.name, files)
    if state == "ok":
        return meta
    why = ("there is no ANN index" if state == "missing" else
           "the ANN index is stale (the index's files changed since it was built)")
    if not ann_cfg.build_on_demand:
        raise LarcqError(f"search.method is ann but {why} (search.ann.name={ann_cfg.name!r} in {index_uri}): "
                         "run `larcq-ray build-ann`, or set search.ann.build_on_demand: true")
    log.warning("%s: building it now (search.ann.build_on_demand)", why)
    return build_ann(index_uri, ann_cfg, shard_chunks, num_cpus)


class AnnSearcher:
    """The FAISS index and its row -> audio map in memory; rows map to global audio indices (positions
    among the ok files sorted by id, as search/sharded.py numbers audios)."""

    def __init__(self, index_uri: str, name: str, audio_ids: pa.Array, nprobe: int):
        faiss = faiss_module()
        store = IndexStore(index_uri)
        faiss_path, rows_path, _ = _paths(name)
        self.index = faiss.deserialize_index(np.frombuffer(store.location.read_bytes(faiss_path), dtype=np.uint8))
        rows = pq.read_table(io.BytesIO(store.location.read_bytes(rows_path))).column("audio_id")
        g = pc.index_in(rows, value_set=pa.array(audio_ids, type=pa.string()))
        if g.null_count:
            raise LarcqError(f"the ANN index {name!r} names audios the index no longer holds: rebuild it "
                             "(`larcq-ray build-ann`)")
        self.row_gidx = g.to_numpy(zero_copy_only=False).astype(np.int64)
        self.set_nprobe(nprobe)

    def set_nprobe(self, nprobe: int) -> None:
        try:
            faiss_module().ParameterSpace().set_index_parameter(self.index, "nprobe", int(nprobe))
        except RuntimeError:  # an index without lists (Flat, HNSW): nothing to set
            pass

    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def candidates(self, whole: np.ndarray, chunks: np.ndarray, chunk_offsets: np.ndarray, n: int | str,
                   rescore: int = 0) -> list[np.ndarray]:
        """Per query, the sorted global indices of the audios of the n nearest chunks of each of its rows
        (n: a number or "auto", see resolve_candidates).

        rescore > 0 keeps only the `rescore` audios with the best approximate vote: the sum over the
        query's rows (whole query and chunks) of the audio's best similarity among the fetched chunks,
        a row that fetched none of its chunks counting the row's lowest fetched similarity (the most
        it could have had). Deep fetches find the audios that match several query events; the vote
        keeps those, so fewer audios are scored exactly."""
        q = len(whole)
        x = np.ascontiguousarray(np.concatenate([whole, chunks]), dtype=np.float32)
        k = min(resolve_candidates(n, self.ntotal()), self.ntotal())
        sims, rows = self.index.search(x, k)
        owner = np.concatenate([np.arange(q), np.repeat(np.arange(q), np.diff(chunk_offsets))])
        aud = np.where(rows >= 0, self.row_gidx[np.maximum(rows, 0)], -1)
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(q + 1))
        out = []
        for i in range(q):  # a loop over queries
            mine = order[bounds[i]:bounds[i + 1]]
            a = aud[mine]
            found = a >= 0
            uniq, inv = np.unique(a[found], return_inverse=True)
            if rescore <= 0 or len(uniq) <= rescore:
                out.append(uniq)
                continue
            d = sims[mine]
            floor = np.where(found, d, np.inf).min(1)
            best = np.repeat(np.where(np.isfinite(floor), floor, 0.0)[:, None], len(uniq), 1)
            np.maximum.at(best, (np.nonzero(found)[0], inv), d[found])
            vote = best.sum(0)
            keep = np.lexsort((uniq, -vote))[:rescore]  # best vote first, ties by audio index
            out.append(np.sort(uniq[keep]))
        return out


def _candidates_task(uri, name, audio_ids, nprobe, queries, n, rescore):
    s = AnnSearcher(uri, name, audio_ids, nprobe)
    return s.candidates(queries.whole_emb, queries.chunk_emb, queries.chunk_offsets, n, rescore)


def ann_candidates(index_uri: str, ann_cfg, audio_ids: pa.Array, queries, num_cpus: float = 1.0) -> list[np.ndarray]:
    """One Ray task loads the ANN index and returns each query's candidate audios (global indices)."""
    import ray

    from larcq_ray.search.sharded import ray_get

    task = ray.remote(_candidates_task).options(num_cpus=num_cpus)
    return ray_get(task.remote(index_uri, ann_cfg.name, audio_ids, ann_cfg.nprobe, queries, ann_cfg.candidates,
                                   ann_cfg.rescore))


def run(cfg) -> dict:
    """`larcq-ray build-ann`: build the ANN index of cfg's index with search.ann's settings."""
    from larcq_ray.core.ray_session import ensure_ray
    from larcq_ray.index.store import index_root

    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    sc = cfg.search
    meta = build_ann(index_root(cfg), sc.ann, sc.shard_chunks, sc.shard_num_cpus)
    log.info("ANN index %r: %s over %d chunks, built in %.1f s", sc.ann.name, meta["factory"], meta["n_rows"],
             meta["build_s"])
    return meta
