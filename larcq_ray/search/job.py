"""Search job: queries -> CLAP text embeddings (queries.parquet) -> vote scoring -> shortlist.

The queries: data.queries (free text, `larcq-ray search --query ...`), else data.queries_csv or
<benchmark>/queries.csv (`query`, optional `audio_id` ground truth, `query_id`, `split_i`).

Outputs in the run directory:
    queries.parquet        query_id, audio_id (ground truth, "" when none), chunk_index (-1 = whole query),
                           text, embedding, truncated; reused when the queries, chunking and model are unchanged
    shortlist.parquet      query_id, mode, rank, audio_id, score (top_k per query and mode)
    results.parquet        per query and mode its top results_k audios, with the matched window of each
                           audio for each query chunk (artifacts.RESULTS); results.md the same, readable
    gt_ranks.parquet       query_id, mode, gt_audio_id, gt_rank (0 = not indexed), gt_score   } only with
    retrieved_<mode>.csv   the research code's layout: query, retrieved_audio_1..k, groundtruth_audio } ground truth
    search_meta.json       counts and settings the evaluation report needs
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from larcq_ray import artifacts
from larcq_ray.config import PipelineConfig
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.inputs import Query, has_ground_truth, queries_csv_path, queries_from_texts, read_queries
from larcq_ray.index.store import IndexStore, index_root
from larcq_ray.models.model_card import read_model_card
from larcq_ray.search.query_chunking import query_chunks
from larcq_ray.search.results import results_markdown, results_table
from larcq_ray.search.scoring import QueryEmbeddings
from larcq_ray.search.stages import ClapTextStage

log = logging.getLogger(__name__)

@dataclass
class QuerySet:
    queries: list[Query]
    embeddings: QueryEmbeddings
    n_truncated: int
    n_fallback: int  # queries that had no chunks for the chunking mode and use the whole query
    chunk_texts: list[str]  # the text of each row of embeddings.chunk_emb


def _fingerprint(cfg: PipelineConfig, source: bytes) -> dict:
    return {
        "model": cfg.model.name_or_path,
        "dtype": cfg.model.dtype,
        **({"adapter": cfg.model.adapter} if cfg.model.adapter else {}),
        "query_chunking": cfg.search.query_chunking,
        **({"query_joins": list(cfg.search.query_joins)} if cfg.search.query_chunking == "joins" else {}),
        "queries_sha256": hashlib.sha256(source).hexdigest(),
    }


def embed_queries(cfg: PipelineConfig, queries: list[Query], out_path: Path) -> tuple[pa.Table, int]:
    import ray

    from larcq_ray.core.ray_session import ensure_ray
    from larcq_ray.core.stage import map_stage

    rows, n_fallback = [], 0
    for q in queries:
        chunks, fell_back = query_chunks(q, cfg.search.query_chunking, cfg.search.query_joins)
        n_fallback += fell_back
        gt = q.audio_id or ""
        rows.append({"query_id": q.query_id, "audio_id": gt, "chunk_index": -1, "text": q.text})
        rows += [{"query_id": q.query_id, "audio_id": gt, "chunk_index": j, "text": t} for j, t in enumerate(chunks)]

    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    stage = ClapTextStage(model=cfg.model.name_or_path, device=cfg.model.device, dtype=cfg.model.dtype,
                          local_files_only=cfg.model.local_files_only, adapter=cfg.model.adapter)
    ds = map_stage(ray.data.from_items(rows), stage, cfg.search.text_batch_size)
    out_rows = []
    failed: list[str] = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i in range(len(batch["text"])):
            if batch["error"][i]:
                failed.append(f"query {int(batch['query_id'][i])}: {batch['error'][i]}")
                continue
            out_rows.append({
                "query_id": int(batch["query_id"][i]), "audio_id": str(batch["audio_id"][i]),
                "chunk_index": int(batch["chunk_index"][i]), "text": str(batch["text"][i]),
                "embedding": np.frombuffer(batch["embedding"][i], dtype=np.float32),
                "truncated": bool(batch["truncated"][i]),
            })
    if failed:
        raise LarcqError(f"{len(failed)} query text(s) could not be embedded: " + "; ".join(failed[:3]))
    if len(out_rows) != len(rows):
        raise LarcqError(f"query embedding returned {len(out_rows)} rows for {len(rows)} texts")
    out_rows.sort(key=lambda r: (r["query_id"], r["chunk_index"]))
    table = artifacts.QUERIES.table(out_rows)
    artifacts.QUERIES.write_to(out_path, table)
    return table, n_fallback


def _query_embeddings(table: pa.Table) -> QueryEmbeddings:
    qid = table.column("query_id").to_numpy()
    cidx = table.column("chunk_index").to_numpy()
    emb = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(), dtype=np.float32)
    emb = emb.reshape(table.num_rows, -1)
    order = np.lexsort((cidx, qid))
    qid, cidx, emb = qid[order], cidx[order], emb[order]
    ids, first = np.unique(qid, return_index=True)
    whole = cidx == -1
    counts = np.add.reduceat((~whole).astype(np.int64), first)
    return QueryEmbeddings(
        query_ids=[str(int(i)) for i in ids],
        whole_emb=np.ascontiguousarray(emb[whole]),
        chunk_emb=np.ascontiguousarray(emb[~whole]),
        chunk_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    )


def _chunk_texts(table: pa.Table) -> list[str]:
    """The texts of the chunk rows in _query_embeddings' order (by query, then chunk)."""
    qid = table.column("query_id").to_numpy()
    cidx = table.column("chunk_index").to_numpy()
    text = np.asarray(table.column("text").to_pylist(), dtype=object)
    order = np.lexsort((cidx, qid))
    return [str(t) for t in text[order][cidx[order] != -1]]


def read_search_queries(cfg: PipelineConfig) -> tuple[list[Query], bytes]:
    """The queries to search and the bytes that identify them (for reusing their embeddings)."""
    if cfg.data.queries:
        queries = queries_from_texts(cfg.data.queries)
        return queries, json.dumps([q.text for q in queries]).encode()
    csv_path = queries_csv_path(cfg.data)
    return read_queries(csv_path), csv_path.read_bytes()


def load_or_embed_queries(cfg: PipelineConfig) -> QuerySet:
    run_dir = Path(cfg.run_dir)
    queries, source = read_search_queries(cfg)
    out_path = artifacts.QUERIES.path(run_dir)
    fp = _fingerprint(cfg, source)
    table = None
    if out_path.exists() and artifacts.QUERIES_META.exists(run_dir):
        meta = artifacts.QUERIES_META.read(run_dir)
        if meta.get("fingerprint") == fp:
            table, n_fallback = artifacts.QUERIES.read(run_dir), meta["n_fallback"]
            log.info("reusing query embeddings from %s", out_path)
    if table is None:
        table, n_fallback = embed_queries(cfg, queries, out_path)
        artifacts.QUERIES_META.write(run_dir, {"fingerprint": fp, "n_fallback": n_fallback})
    truncated = table.filter(pc.equal(table.column("chunk_index"), -1)).column("truncated").to_numpy(zero_copy_only=False)
    return QuerySet(queries, _query_embeddings(table), int(truncated.sum()), n_fallback, _chunk_texts(table))


def check_index_model(cfg: PipelineConfig, store: IndexStore) -> dict:
    """The index's meta, after checking it was built with the config's model (and adapter)."""
    imeta = store.meta()
    if imeta["model"] != cfg.model.name_or_path:
        raise LarcqError(
            f"the index in {store.uri} was built with model {imeta['model']!r} but the config names "
            f"{cfg.model.name_or_path!r}: query and audio embeddings must come from the same model"
        )
    if imeta.get("adapter") != cfg.model.adapter:
        raise LarcqError(
            f"the index in {store.uri} was built with adapter {imeta.get('adapter')!r} but the config names "
            f"{cfg.model.adapter!r}: query and audio embeddings must come from the same model"
        )
    return imeta


def run_search(cfg: PipelineConfig, show_progress: bool = True) -> dict:
    run_dir = Path(cfg.run_dir)
    store = IndexStore(index_root(cfg))
    check_index_model(cfg, store)
    files = store.read_files()
    recorded = set(files.column("audio_id").to_pylist())
    qs = load_or_embed_queries(cfg)
    has_gt = has_ground_truth(qs.queries)
    unknown = sorted({q.audio_id for q in qs.queries if q.audio_id is not None} - recorded)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise LarcqError(f"queries name {len(unknown)} audio file(s) that the index never saw: {shown} "
                         "(index the corpus that holds them first)")
    if qs.n_truncated:
        log.warning("%d of %d queries are longer than the text tower's limit and were truncated (not dropped)",
                    qs.n_truncated, len(qs.queries))
    if qs.n_fallback and cfg.search.query_chunking != "none":
        hint = (" (add the joins they use to search.query_joins)"
                if cfg.search.query_chunking in ("columns", "joins") else "")
        log.warning("%d of %d queries could not be cut into chunks by query_chunking=%s and are scored as one "
                    "whole-query chunk%s", qs.n_fallback, len(qs.queries), cfg.search.query_chunking, hint)

    from larcq_ray.core.ray_session import ensure_ray
    from larcq_ray.search.sharded import ShardOptions, ShardSet, top_audios

    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    sc = cfg.search
    ok = store.ok_files()
    # Shard tasks load and score their shards; the driver holds the files table and per-shard answers.
    shards = ShardSet(store.uri, ShardOptions.from_config(sc, cfg.model.device), persistent=False, files=ok)
    pos = {a: i for i, a in enumerate(shards.audio_ids)}
    gt_index = None
    if has_gt:
        gt_index = np.array([pos.get(q.audio_id, -1) if q.audio_id is not None else -1 for q in qs.queries],
                            dtype=np.int64)
    candidates = None
    if sc.method == "ann":
        from larcq_ray.search.ann import ann_candidates, ensure_ann

        ensure_ann(store.uri, sc.ann, ok, sc.shard_chunks, sc.shard_num_cpus)
        candidates = ann_candidates(store.uri, sc.ann, ok.column("audio_id"), qs.embeddings, sc.shard_num_cpus)
    log.info("scoring %d queries against %d audios in %d shard(s) (%s)", len(qs.queries), shards.n_audios,
             len(shards.shards), sc.method)
    from tqdm import tqdm

    n_jobs = len(shards.shards) if candidates is None else None  # ANN: one job per shard holding candidates
    with tqdm(total=n_jobs, unit="shard", desc="search", disable=not show_progress) as bar:
        results = shards.search(qs.embeddings, sc.modes, top_k=sc.top_k, gt_gidx=gt_index, candidates=candidates,
                                progress=bar.update)
        if n_jobs is None:
            bar.total = bar.n
            bar.refresh()
    # results.parquet needs the embeddings and chunk times of the top results_k audios only
    sub_audios, times, cut = top_audios(store, ok, results, sc.results_k)
    table = results_table(qs.queries, qs.embeddings, qs.chunk_texts, sub_audios, times, cut, sc.results_k)
    _write_outputs(run_dir, cfg, qs, shards.audio_ids, results, has_gt)
    artifacts.RESULTS.write(run_dir, table)
    gt = {q.query_id: q.audio_id for q in qs.queries if q.audio_id is not None} if has_gt else None
    md = results_markdown(table, cfg.search.report_mode(), has_gt, gt)
    (run_dir / artifacts.RESULTS_MD).write_text(md)
    meta = {
        "n_queries": len(qs.queries),
        "n_audios": shards.n_audios,
        "n_files_recorded": len(recorded),
        "modes": list(cfg.search.modes),
        "top_k": cfg.search.top_k,
        "model": cfg.model.name_or_path,
        "model_card": read_model_card(cfg.model.name_or_path),
        "query_chunking": cfg.search.query_chunking,
        "n_truncated_queries": qs.n_truncated,
        "n_queries_without_chunks": qs.n_fallback,
        "n_missing_gt": int((gt_index < 0).sum()) if has_gt else 0,
        "has_ground_truth": has_gt,
        "results_mode": cfg.search.report_mode(),
        "index_has_whole_file": sub_audios.whole_emb is not None,
        "method": sc.method,
        "n_shards": len(shards.shards),
    }
    artifacts.SEARCH_META.write(run_dir, meta)
    return meta


def _write_outputs(run_dir: Path, cfg: PipelineConfig, qs: QuerySet, audio_ids: list[str], results: dict,
                   has_gt: bool = True) -> None:
    ids = np.asarray(audio_ids, dtype=object)
    qids = np.array([q.query_id for q in qs.queries], dtype=np.int32)
    short, ranks = [], []
    for mode, r in results.items():
        q_n, k = r.topk_index.shape
        short.append(pa.table({
            "query_id": np.repeat(qids, k),
            "mode": np.full(q_n * k, mode, dtype=object),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), q_n),
            "audio_id": ids[r.topk_index.reshape(-1)],
            "score": r.topk_score.reshape(-1).astype(np.float32),
        }))
        if not has_gt:
            continue
        ranks.append(pa.table({
            "query_id": qids,
            "mode": np.full(q_n, mode, dtype=object),
            "gt_audio_id": np.array([q.audio_id for q in qs.queries], dtype=object),
            "gt_rank": r.gt_rank.astype(np.int64),
            "gt_score": r.gt_score.astype(np.float32),
        }))
        kk = min(cfg.search.retrieved_csv_k, k)
        with open(run_dir / artifacts.retrieved_csv(mode), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["query"] + [f"retrieved_audio_{i + 1}" for i in range(kk)] + ["groundtruth_audio"])
            for qi, q in enumerate(qs.queries):
                w.writerow([q.text] + list(ids[r.topk_index[qi, :kk]]) + [q.audio_id])
    artifacts.SHORTLIST.write(run_dir, pa.concat_tables(short))
    if has_gt:
        artifacts.GT_RANKS.write(run_dir, pa.concat_tables(ranks))
        return
    # Queries without ground truth: nothing to rank against; an earlier run's files would mislead evaluate.
    artifacts.GT_RANKS.path(run_dir).unlink(missing_ok=True)
    for stale in run_dir.glob(artifacts.retrieved_csv("*")):
        stale.unlink()


def run(cfg: PipelineConfig) -> dict:
    """`larcq-ray search`: embed the queries, score every indexed audio, write the shortlist."""
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    meta = run_search(cfg)
    log.info("searched %d queries over %d audios (%s); results: %s", meta["n_queries"], meta["n_audios"],
             ", ".join(meta["modes"]), Path(cfg.run_dir) / artifacts.RESULTS_MD)
    return meta
