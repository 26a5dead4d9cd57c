"""Re-rank job: shortlist + captions -> the /rerank service -> reranked.parquet.

Per query, the top `top_n` audios of one scoring mode's shortlist are re-scored from their
captions:
- `match: timeline`: the whole query against each audio's timeline caption (all windows joined);
- `match: windows`: each query chunk against every window caption; an audio's score for a chunk
  is its best window, and the chunks vote (sum or max), like the audio-max+query-* modes.
Scores are min-max normalized within the query's candidates, then fused: `rerank` (the paper:
re-rank score alone) or `weighted` (clap_weight * CLAP + (1 - clap_weight) * re-rank).
A candidate without a caption keeps its (normalized) CLAP score, and its row says why.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from larcq_ray.errors import LarcqError

log = logging.getLogger(__name__)

RERANKED_SCHEMA = pa.schema([
    ("query_id", pa.int32()),
    ("rank", pa.int32()),
    ("audio_id", pa.string()),
    ("clap_rank", pa.int32()),
    ("clap_score", pa.float32()),
    ("rerank_score", pa.float32()),
    ("final_score", pa.float32()),
    ("note", pa.string()),
])


class RerankJobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: str = "audio-max+query-sum"  # whose shortlist is re-ranked
    top_n: int = Field(5, ge=1)
    match: Literal["timeline", "windows"] = "windows"
    query_vote: Literal["sum", "max"] = "sum"
    fusion: Literal["rerank", "weighted"] = "rerank"
    clap_weight: float = Field(0.0, ge=0.0, le=1.0)
    # Where the /rerank service is: None starts one in this Ray cluster for the job and calls it
    # through a Serve handle; "serve://APP" uses a running app of this cluster through a handle;
    # "http(s)://HOST:PORT" calls any endpoint of the Cohere/Jina/vLLM rerank shape.
    endpoint: Optional[str] = None
    api_key: Optional[str] = None
    concurrency: int = Field(16, ge=1)  # requests in flight, so the service can batch them


class RerankClient(Protocol):
    def rerank(self, query: str, documents: list[str]) -> list[float]:
        """Relevance per document, in the order given."""


class HttpRerankClient:
    """Any service speaking the Cohere/Jina/vLLM /rerank shape, ours included."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 120.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = base_url.rstrip("/") + "/rerank"
        self.client = httpx.Client(headers=headers, timeout=timeout_s)

    def rerank(self, query: str, documents: list[str]) -> list[float]:
        r = self.client.post(self.url, json={"query": query, "documents": documents, "return_documents": False})
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - any non-JSON error body
                msg = r.text[:200]
            raise LarcqError(f"re-rank service at {self.url} answered {r.status_code}: {msg}")
        scores = [float("nan")] * len(documents)
        for item in r.json()["results"]:
            scores[item["index"]] = float(item["relevance_score"])
        return scores


class ServeHandleRerankClient:
    """Calls the re-rank deployment through a Serve handle: for jobs running in the same Ray
    cluster as the app (no HTTP proxy hop, no port to expose). Requests from concurrent threads
    still meet in the replica's batch queue."""

    def __init__(self, app_name: str, timeout_s: float = 300.0):
        from ray import serve

        try:
            self.handle = serve.get_app_handle(app_name)
        except Exception as e:  # noqa: BLE001 - e.g. no Serve instance or no such app
            raise LarcqError(f"no Serve application {app_name!r} in this Ray cluster: {e}") from e
        self.app_name, self.timeout_s = app_name, timeout_s

    def rerank(self, query: str, documents: list[str]) -> list[float]:
        try:
            scores = self.handle.score.remote(query, documents).result(timeout_s=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - Ray wraps the replica's error; keep its last line
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            raise LarcqError(f"re-rank app {self.app_name!r} failed: {lines[-1] if lines else type(e).__name__}") from e
        if len(scores) != len(documents):
            raise LarcqError(f"re-rank app {self.app_name!r} returned {len(scores)} scores for {len(documents)} documents")
        return [float(s) for s in scores]


SERVE_SCHEME = "serve://"


def make_client(endpoint: str, api_key: str | None = None) -> RerankClient:
    """`serve://APP` -> a Serve handle to APP in this Ray cluster; http(s)://... -> HTTP."""
    if endpoint.startswith(SERVE_SCHEME):
        return ServeHandleRerankClient(endpoint[len(SERVE_SCHEME):] or "larcq-rerank")
    if endpoint.startswith(("http://", "https://")):
        return HttpRerankClient(endpoint, api_key)
    raise LarcqError(f"rerank.endpoint {endpoint!r}: expected http(s)://HOST:PORT or serve://APP_NAME")


@dataclass
class _Candidate:
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


def load_captions(path: Path) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str]]:
    """(timeline caption, window captions in order, failure reason) per audio id."""
    if not path.exists():
        raise LarcqError(f"no captions at {path}: run `larcq-ray caption` first")
    t = pq.read_table(path).to_pandas()
    timeline, windows, failed = {}, defaultdict(list), {}
    for row in t.sort_values(["audio_id", "chunk_index"]).itertuples():
        if row.status != "ok":
            failed[row.audio_id] = row.error or "captioning failed"
        elif row.chunk_index == -1:
            timeline[row.audio_id] = row.caption
        else:
            windows[row.audio_id].append(row.caption)
    return timeline, dict(windows), failed


def rerank_shortlist(run_dir: Path, job: RerankJobConfig, client: RerankClient,
                     captions_path: Path | None = None) -> dict:
    run_dir = Path(run_dir)
    short_path, q_path = run_dir / "shortlist.parquet", run_dir / "queries.parquet"
    if not short_path.exists() or not q_path.exists():
        raise LarcqError(f"no search results in {run_dir}: run `larcq-ray search` first")
    short = pq.read_table(short_path).to_pandas()
    short = short[(short["mode"] == job.mode) & (short["rank"] <= job.top_n)]
    if short.empty:
        raise LarcqError(f"the shortlist in {run_dir} has no rows for mode {job.mode!r}; "
                         f"modes there: {sorted(pq.read_table(short_path, columns=['mode']).column('mode').unique().to_pylist())}")
    queries = pq.read_table(q_path).to_pandas()
    q_text = {int(r.query_id): r.text for r in queries[queries.chunk_index == -1].itertuples()}
    q_chunks = {int(k): list(g.sort_values("chunk_index").text) for k, g in queries[queries.chunk_index >= 0].groupby("query_id")}
    timeline, windows, failed = load_captions(captions_path or run_dir / "captions.parquet")

    by_query: dict[int, list[_Candidate]] = defaultdict(list)
    for r in short.sort_values(["query_id", "rank"]).itertuples():
        by_query[int(r.query_id)].append(_Candidate(int(r.query_id), r.audio_id, int(r.rank), float(r.score)))

    def score_query(qid: int) -> list[dict]:
        cands = by_query[qid]
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
                for chunk in q_chunks.get(qid) or [q_text[qid]]:
                    s = np.asarray(client.rerank(chunk, docs))
                    per_chunk.append([s[owner == c.audio_id].max() for c in captioned])  # best window
                grid = np.asarray(per_chunk)  # (query chunks, candidates)
                votes = grid.sum(axis=0) if job.query_vote == "sum" else grid.max(axis=0)
            else:
                votes = client.rerank(q_text[qid], [timeline[c.audio_id] for c in captioned])
            for c, v in zip(captioned, votes):
                raw[c.audio_id] = float(v)
        rr = np.array([raw[c.audio_id] for c in cands])
        clap_n, rr_n = _normalize(np.array([c.clap_score for c in cands])), _normalize(rr)
        final = rr_n if job.fusion == "rerank" else job.clap_weight * clap_n + (1 - job.clap_weight) * rr_n
        final = np.where(np.isfinite(final), final, clap_n)  # no caption: keeps its CLAP score
        rows = []
        for c, r_, f in zip(cands, rr, final):
            note = "" if np.isfinite(r_) else f"no caption ({failed.get(c.audio_id, 'audio not captioned')}): kept its CLAP score"
            rows.append({"query_id": qid, "audio_id": c.audio_id, "clap_rank": c.clap_rank, "clap_score": c.clap_score,
                         "rerank_score": float(r_), "final_score": float(f), "note": note})
        # stable: ties keep the CLAP order
        rows.sort(key=lambda d: (-d["final_score"], d["clap_rank"]))
        for i, d in enumerate(rows, 1):
            d["rank"] = i
        return rows

    with ThreadPoolExecutor(max_workers=job.concurrency) as pool:
        all_rows = [row for rows in pool.map(score_query, sorted(by_query)) for row in rows]
    pq.write_table(pa.Table.from_pylist(all_rows, schema=RERANKED_SCHEMA), run_dir / "reranked.parquet")
    n_uncaptioned = sum(1 for r in all_rows if r["note"])
    if n_uncaptioned:
        log.warning("%d candidates had no caption and kept their CLAP score", n_uncaptioned)
    meta = {"n_queries": len(by_query), "n_candidates": len(all_rows), "n_uncaptioned": n_uncaptioned,
            "mode": job.mode, "top_n": job.top_n, "match": job.match, "fusion": job.fusion}
    (run_dir / "rerank_meta.json").write_text(json.dumps(meta, indent=2))
    return meta
