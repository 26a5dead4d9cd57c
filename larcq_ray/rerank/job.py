"""Re-rank job: shortlist + captions -> the /rerank service -> reranked.parquet.

Per query, the top `top_n` audios of one scoring mode's shortlist are re-scored from their
captions:
- `match: timeline`: the whole query against each audio's timeline caption (all windows joined);
- `match: windows`: each query chunk against every window caption; an audio's score for a chunk
  is its best window, and the chunks vote (sum or max), like the audio-max+query-* modes.
Scores are min-max normalized within the query's candidates, then fused: `rerank` (the paper:
re-rank score alone) or `weighted` (clap_weight * CLAP + (1 - clap_weight) * re-rank).
A candidate without a caption keeps its (normalized) CLAP score, and its row says why.

One query never ends the job: a request over the service's document limit is split, and a query
whose re-rank fails keeps its CLAP order, the reason in each of its rows.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from larcq_ray import artifacts
from larcq_ray.core.errors import LarcqError, user_message
from larcq_ray.rerank.clients import RerankClient, TooManyDocuments
from larcq_ray.rerank.config import RerankJobConfig

log = logging.getLogger(__name__)

@dataclass
class Candidate:
    query_id: int
    audio_id: str
    clap_rank: int
    clap_score: float


def _normalize(x: np.ndarray) -> np.ndarray:
    """Min-max within one query's candidates; all-equal scores map to 0.5."""
    finite = np.isfinite(x)
    out = np.full(len(x), np.nan)
    if finite.any():
        lo, hi = x[finite].min(), x[finite].max()
        out[finite] = 0.5 if hi - lo < 1e-12 else (x[finite] - lo) / (hi - lo)
    return out


def fuse(clap_scores: np.ndarray, rerank_scores: np.ndarray, fusion: str, clap_weight: float) -> np.ndarray:
    """One query's final scores: both normalized within its candidates, then the re-rank score alone
    (`rerank`, the paper) or `clap_weight` * CLAP + (1 - clap_weight) * re-rank (`weighted`). A
    candidate without a re-rank score (NaN: no caption) keeps its normalized CLAP score."""
    clap_n, rr_n = _normalize(np.asarray(clap_scores, float)), _normalize(np.asarray(rerank_scores, float))
    final = rr_n if fusion == "rerank" else clap_weight * clap_n + (1 - clap_weight) * rr_n
    return np.where(np.isfinite(final), final, clap_n)


def rerank_in_parts(client: RerankClient, query: str, documents: list[str], limit: int | None) -> list[float]:
    """Scores for every document, in requests of at most `limit` documents; a request the service
    refuses for its size (413) is split in halves until it fits."""
    if limit and len(documents) > limit:
        return [s for i in range(0, len(documents), limit)
                for s in rerank_in_parts(client, query, documents[i:i + limit], limit)]
    try:
        return list(client.rerank(query, documents))
    except TooManyDocuments:
        if len(documents) < 2:
            raise
        half = len(documents) // 2
        return rerank_in_parts(client, query, documents[:half], None) + \
            rerank_in_parts(client, query, documents[half:], None)


@dataclass
class Captions:
    timeline: dict[str, str]  # audio id -> timeline caption (all windows joined)
    windows: dict[str, list[str]]  # audio id -> window captions in order
    failed: dict[str, str]  # audio id -> why it has no caption


def load_captions(path: Path | str, filesystem=None) -> Captions:
    t = artifacts.CAPTIONS.read_from(path, filesystem=filesystem).to_pandas()
    timeline, windows, failed = {}, defaultdict(list), {}
    for row in t.sort_values(["audio_id", "chunk_index"]).itertuples():
        if row.status != "ok":
            failed[row.audio_id] = row.error or "captioning failed"
        elif row.chunk_index == -1:
            timeline[row.audio_id] = row.caption
        else:
            windows[row.audio_id].append(row.caption)
    return Captions(timeline, dict(windows), failed)


def rerank_candidates(client: RerankClient, query: str, chunks: list[str], cands: list[Candidate],
                      captions: Captions, job: RerankJobConfig) -> list[dict]:
    """One query's candidates (CLAP order) re-scored from their captions and fused, best first.

    Rows: query_id, audio_id, clap_rank, clap_score, rerank_score (NaN: no caption), final_score,
    rank, note (why a candidate kept its CLAP score). Used by the job and by /search's rerank."""
    timeline, windows, limit = captions.timeline, captions.windows, job.max_documents
    captioned = [c for c in cands if c.audio_id in timeline]
    raw = {c.audio_id: float("nan") for c in cands}
    if captioned:
        use_windows = job.match == "windows" and all(windows.get(c.audio_id) for c in captioned)
        if use_windows:
            docs, owner = [], []
            for c in captioned:
                for w in windows[c.audio_id]:
                    docs.append(w)
                    owner.append(c.audio_id)
            owner = np.asarray(owner, dtype=object)
            per_chunk = []
            for chunk in chunks or [query]:
                s = np.asarray(rerank_in_parts(client, chunk, docs, limit))
                per_chunk.append([s[owner == c.audio_id].max() for c in captioned])  # best window
            grid = np.asarray(per_chunk)  # (query chunks, candidates)
            votes = grid.sum(axis=0) if job.query_vote == "sum" else grid.max(axis=0)
        else:
            votes = rerank_in_parts(client, query, [timeline[c.audio_id] for c in captioned], limit)
        for c, v in zip(captioned, votes):
            raw[c.audio_id] = float(v)
    rr = np.array([raw[c.audio_id] for c in cands])
    final = fuse(np.array([c.clap_score for c in cands]), rr, job.fusion, job.clap_weight)
    rows = []
    for c, r_, f in zip(cands, rr, final):
        why = captions.failed.get(c.audio_id, "audio not captioned")
        note = "" if np.isfinite(r_) else f"no caption ({why}): kept its CLAP score"
        rows.append({"query_id": c.query_id, "audio_id": c.audio_id, "clap_rank": c.clap_rank,
                     "clap_score": c.clap_score, "rerank_score": float(r_), "final_score": float(f), "note": note})
    # stable: ties keep the CLAP order
    rows.sort(key=lambda d: (-d["final_score"], d["clap_rank"]))
    for i, d in enumerate(rows, 1):
        d["rank"] = i
    return rows


def rerank_shortlist(run_dir: Path, job: RerankJobConfig, client: RerankClient,
                     captions_path: Path | None = None) -> dict:
    run_dir = Path(run_dir)
    if not artifacts.SHORTLIST.exists(run_dir) or not artifacts.QUERIES.exists(run_dir):
        raise LarcqError(f"no search results in {run_dir}: run `larcq-ray search` first")
    all_short = artifacts.SHORTLIST.read_pandas(run_dir)
    short = all_short[(all_short["mode"] == job.mode) & (all_short["rank"] <= job.top_n)]
    if short.empty:
        raise LarcqError(f"the shortlist in {run_dir} has no rows for mode {job.mode!r}; "
                         f"modes there: {sorted(all_short['mode'].unique())}")
    queries = artifacts.QUERIES.read_pandas(run_dir)
    q_text = {int(r.query_id): r.text for r in queries[queries.chunk_index == -1].itertuples()}
    q_chunks = {int(k): list(g.sort_values("chunk_index").text) for k, g in queries[queries.chunk_index >= 0].groupby("query_id")}
    captions = load_captions(captions_path or artifacts.CAPTIONS.path(run_dir))

    by_query: dict[int, list[Candidate]] = defaultdict(list)
    for r in short.sort_values(["query_id", "rank"]).itertuples():
        by_query[int(r.query_id)].append(Candidate(int(r.query_id), r.audio_id, int(r.rank), float(r.score)))

    def score_query(qid: int) -> list[dict]:
        try:
            return rerank_candidates(client, q_text[qid], q_chunks.get(qid) or [], by_query[qid], captions, job)
        except Exception as e:  # noqa: BLE001 - one query never ends the job
            reason = user_message(e) or f"{type(e).__name__}: {str(e).strip()[:200]}"
            rows = [{"query_id": qid, "audio_id": c.audio_id, "clap_rank": c.clap_rank, "clap_score": c.clap_score,
                     "rerank_score": float("nan"), "final_score": float(s), "rank": c.clap_rank,
                     "note": f"re-rank failed ({reason}): kept its CLAP order"}
                    for c, s in zip(by_query[qid], _normalize(np.array([c.clap_score for c in by_query[qid]])))]
            return rows

    with ThreadPoolExecutor(max_workers=job.concurrency) as pool:
        all_rows = [row for rows in pool.map(score_query, sorted(by_query)) for row in rows]
    artifacts.RERANKED.write(run_dir, all_rows)
    failed_q = sorted({r["query_id"] for r in all_rows if r["note"].startswith("re-rank failed")})
    n_uncaptioned = sum(1 for r in all_rows if r["note"].startswith("no caption"))
    if n_uncaptioned:
        log.warning("%d candidates had no caption and kept their CLAP score", n_uncaptioned)
    if failed_q:
        first = next(r["note"] for r in all_rows if r["query_id"] == failed_q[0])
        log.warning("%d of %d queries could not be re-ranked and kept their CLAP order (first: query %d, %s)",
                    len(failed_q), len(by_query), failed_q[0], first)
    meta = {"n_queries": len(by_query), "n_candidates": len(all_rows), "n_uncaptioned": n_uncaptioned,
            "n_failed_queries": len(failed_q), "failed_query_ids": failed_q[:100],
            "mode": job.mode, "top_n": job.top_n, "match": job.match, "fusion": job.fusion}
    artifacts.RERANK_META.write(run_dir, meta)
    return meta


def run(cfg) -> dict:
    """`larcq-ray rerank`: re-rank the shortlist through the /rerank service (started here when
    rerank.endpoint is unset, then called through a Serve handle)."""
    from larcq_ray.rerank.clients import SERVE_SCHEME, make_client

    started = False
    job, endpoint, key = cfg.rerank, cfg.rerank.endpoint, cfg.rerank.api_key
    if endpoint is None or endpoint.startswith(SERVE_SCHEME):
        from larcq_ray.core.ray_session import ensure_ray

        ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    if endpoint is None:  # deploy the service in this Ray cluster for the job, call it by handle
        from larcq_ray.rerank.app import run_server
        from larcq_ray.rerank.config import APP_NAME

        run_server(cfg.serve, blocking=False)
        endpoint, started = SERVE_SCHEME + APP_NAME, True
        if job.max_documents is None:
            job = job.model_copy(update={"max_documents": cfg.serve.max_documents})
    try:
        meta = rerank_shortlist(Path(cfg.run_dir), job, make_client(endpoint, key))
    finally:
        if started:
            from ray import serve

            serve.delete(APP_NAME)
    log.info("re-ranked the top %d of %d queries (%s shortlist) via %s: %s", meta["top_n"], meta["n_queries"],
             meta["mode"], endpoint, artifacts.RERANKED.path(cfg.run_dir))
    return meta
