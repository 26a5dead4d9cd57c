"""HTTP side of the /search service: a FastAPI app served as a Ray Serve ingress deployment.

Routes (relative to the application's route_prefix):
  POST /search         SearchRequest -> SearchResponse   (Bearer auth when an api_key is set)
                       rerank: true re-orders the top_k through the re-rank service (rerank.endpoint;
                       default the larcq-rerank app of this Serve instance) from stored captions
  GET  /healthz        {"status": "ok", "model", "n_audios", "modes", "default_mode", "auth_required",
                        "n_captioned"}
                       (no auth: for load-balancer probes and the page)
  GET  /               the search page (search/page.html; no auth: it asks for the key itself)
  GET  /audio/{id}     an indexed recording, streamed from the corpus with HTTP Range (206); with an
                       api_key it needs the signed token of a /search answer's audio_url, or Bearer

Each replica loads CLAP's text tower once and keeps the index's shards loaded (search/sharded.py:
in the replica for a one-shard index, else one Ray actor per shard; with search.method: ann also the
FAISS index) and answers a query as `larcq-ray search --query` does: the same chunking
(search.query_chunking / query_joins), the same sharded scoring and the same matched windows
(search/results.results_table, over the top audios' chunks only).

Errors have the /rerank service's shape {"error": {"message", "type", "field"}} and handlers:
  400 body is not JSON          401 missing / wrong Bearer token
  413 body over max_body_bytes, or a query over max_query_chars (field "query")
  422 schema errors (empty query, unknown mode, top_k < 1 or not an int), top_k over max_top_k,
      a mode the index cannot score (whole-file modes on an index without whole-file embeddings)
  503 rerank asked but the re-rank service cannot be reached or fails
  404 /audio of an id the index does not hold (only indexed recordings under the corpus root are
      served: never a path outside it), or whose file has gone
"""

# No `from __future__ import annotations`: FastAPI must see `request: Request` as the class, not a string.
import asyncio
import functools
import logging
import mimetypes
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from larcq_ray.core.errors import LarcqError
from larcq_ray.rerank.protocol import ErrorResponse
from larcq_ray.rerank.router import (
    ApiError,
    _api_error,
    _http_error,
    _validation_error,
    check_bearer,
    error_response,
    parse_json,
    read_body,
)
from larcq_ray.core.service_metrics import install_request_metrics
from larcq_ray.search import audio_tokens
from larcq_ray.search.config import MODES
from larcq_ray.search.protocol import SearchHealthResponse, SearchRequest, SearchResponse, SearchResult, Window

log = logging.getLogger(__name__)

fastapi_app = FastAPI(
    title="LARCQ search",
    description="Search an indexed corpus with a long free-text query: ranked audios and their matched windows.",
)
install_request_metrics(fastapi_app, default_app="search")
# The same handlers as /rerank: one error shape across the services.
fastapi_app.add_exception_handler(ApiError, _api_error)
fastapi_app.add_exception_handler(RequestValidationError, _validation_error)
fastapi_app.add_exception_handler(StarletteHTTPException, _http_error)


@fastapi_app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in the search service")
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


def parse_search_request(body: bytes) -> SearchRequest:
    data = parse_json(body)
    try:
        return SearchRequest.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False))


class SearchEngine:
    """CLAP's text tower and the index of cfg.run_dir, in memory; one query at a time."""

    def __init__(self, cfg) -> None:  # cfg: larcq_ray.config.PipelineConfig
        from larcq_ray.core.devices import resolve_device
        from larcq_ray.core.inputs import corpus_root
        from larcq_ray.index.store import IndexStore, index_root
        from larcq_ray.models.clap import ClapTextEncoder
        from larcq_ray.search.job import check_index_model
        from larcq_ray.search.scoring import _SIDES
        from larcq_ray.search.sharded import ShardOptions, ShardSet

        self.cfg = cfg
        sc = cfg.search
        self.store = store = IndexStore(index_root(cfg))
        check_index_model(cfg, store)
        self.files = store.ok_files()
        # The shards stay loaded while the replica lives: in this process for a one-shard index,
        # else one Ray actor per shard (search.shard_num_cpus / shard_num_gpus each).
        self.shards = ShardSet(store.uri, ShardOptions.from_config(sc, cfg.model.device), persistent=True,
                               in_process=True, files=self.files)
        self._indexed = set(self.shards.audio_ids)
        self.ann = None
        if sc.method == "ann":
            from larcq_ray.search.ann import AnnSearcher, ensure_ann

            ensure_ann(store.uri, sc.ann, self.files, sc.shard_chunks, sc.shard_num_cpus)
            self.ann = AnnSearcher(store.uri, sc.ann.name, self.files.column("audio_id"), sc.ann.nprobe)
        try:
            self.corpus_root: Optional[Path] = corpus_root(cfg.data).resolve()
        except LarcqError:  # no data section here: search works, /audio answers 404
            self.corpus_root = None
        m = cfg.model
        self.encoder = ClapTextEncoder(m.name_or_path, m.device, m.dtype, m.local_files_only, adapter=m.adapter)
        self.device = str(resolve_device(m.device, "model.device"))
        dim = self.encoder(["probe"]).embeddings.shape[1]
        if dim != self.shards.info["dim"]:
            raise LarcqError("query and audio embedding sizes differ: rebuild the index with the config's model")
        has_whole = self.shards.info["has_whole"]
        self.modes = [md for md in MODES if has_whole or _SIDES[md][0] != "whole"]
        serve_cfg = cfg.search.serve
        self.default_mode = serve_cfg.default_mode or cfg.search.report_mode()
        if self.default_mode not in self.modes:
            raise LarcqError(f"the default mode {self.default_mode!r} needs whole-file embeddings, which the "
                             f"index in {store.uri} lacks; set search.serve.default_mode to one of {self.modes}")
        self.model_name = m.name_or_path
        self.captions = self._load_captions(cfg)
        self._lock = threading.Lock()  # one query at a time through the model and the scorer

    @staticmethod
    def _load_captions(cfg):
        """Stored captions for rerank (search.serve.captions, else run_dir's captions.parquet); None if none."""
        from larcq_ray import artifacts
        from larcq_ray.core.storage import open_location
        from larcq_ray.rerank.job import load_captions

        given = cfg.search.serve.captions
        if given is not None:
            loc, rel = open_location(given), ""
        else:  # the caption job's, if it wrote them (run_dir may be an object store: read in place)
            loc, rel = open_location(cfg.run_dir), artifacts.CAPTIONS.relpath
            if not loc.exists(rel):
                return None
        return load_captions(loc.path(rel), filesystem=loc.fs)

    def rerank(self, response: SearchResponse, client) -> SearchResponse:
        """Re-order `response`'s results from their captions, as `larcq-ray rerank` does (cfg.rerank)."""
        from larcq_ray.rerank.job import Candidate, Captions, rerank_candidates

        captions = self.captions or Captions({}, {}, {})
        cands = [Candidate(0, r.audio_id, r.rank, r.score) for r in response.results]
        chunks = response.chunks if len(response.chunks) > 1 else []
        rows = rerank_candidates(client, response.query, chunks, cands, captions, self.cfg.rerank)
        by_id = {r.audio_id: r for r in response.results}
        results = []
        for row in rows:
            r = by_id[row["audio_id"]]
            rr = row["rerank_score"]
            note = row["note"] if self.captions is not None else \
                "no caption (the service has no stored captions: run `larcq-ray caption`): kept its CLAP score"
            results.append(r.model_copy(update={
                "rank": row["rank"], "score": row["final_score"], "clap_rank": row["clap_rank"],
                "clap_score": row["clap_score"], "rerank_score": rr if np.isfinite(rr) else None,
                "note": "" if np.isfinite(rr) else note}))
        return response.model_copy(update={
            "results": results, "reranked": True,
            "uncaptioned": [r.audio_id for r in results if r.rerank_score is None]})

    @property
    def n_audios(self) -> int:
        return self.shards.n_audios

    def audio_path(self, audio_id: str) -> Path:
        """The file of an indexed recording, inside the corpus root; ApiError 404 otherwise."""
        if audio_id not in self._indexed or self.corpus_root is None:
            raise ApiError(404, f"no indexed audio {audio_id!r}", "not_found_error", "audio_id")
        path = (self.corpus_root / audio_id).resolve()
        if not path.is_relative_to(self.corpus_root) or not path.is_file():  # a symlink out, or gone
            raise ApiError(404, f"the file of audio {audio_id!r} is not in the corpus", "not_found_error", "audio_id")
        return path

    def search(self, text: str, top_k: int, mode: str) -> SearchResponse:
        import torch

        from larcq_ray.core.inputs import queries_from_texts
        from larcq_ray.search.query_chunking import query_chunks
        from larcq_ray.search.results import results_table
        from larcq_ray.search.scoring import QueryEmbeddings
        from larcq_ray.search.sharded import top_audios

        search_cfg = self.cfg.search
        query = queries_from_texts([text], "query")[0]
        chunks, _ = query_chunks(query, search_cfg.query_chunking, search_cfg.query_joins)
        k = min(top_k, self.n_audios)
        with self._lock, torch.inference_mode():
            out = self.encoder([query.text, *chunks])
            emb = np.asarray(out.embeddings, dtype=np.float32)
            q_emb = QueryEmbeddings(query_ids=["0"], whole_emb=emb[:1], chunk_emb=np.ascontiguousarray(emb[1:]),
                                    chunk_offsets=np.array([0, len(chunks)], dtype=np.int64))
            cands = None
            if self.ann is not None:
                cands = self.ann.candidates(q_emb.whole_emb, q_emb.chunk_emb, q_emb.chunk_offsets,
                                            search_cfg.ann.candidates, search_cfg.ann.rescore)
            scores = self.shards.search(q_emb, [mode], top_k=k, candidates=cands)
            audios, times, cut = top_audios(self.store, self.files, scores, k)
            table = results_table([query], q_emb, chunks, audios, times, cut, k, device=self.device)
        results: dict[int, SearchResult] = {}
        for row in table.to_pylist():
            r = results.get(row["rank"])
            if r is None:
                r = results[row["rank"]] = SearchResult(rank=row["rank"], audio_id=row["audio_id"],
                                                        score=float(row["score"]), windows=[])
            if row["start_s"] is not None:
                r.windows.append(Window(chunk=row["query_chunk"], text=row["query_chunk_text"],
                                        start_s=row["start_s"], end_s=row["end_s"],
                                        similarity=float(row["window_score"])))
        return SearchResponse(query=query.text, mode=mode, chunks=chunks, truncated=bool(out.truncated[0]),
                              n_audios=self.n_audios, results=[results[i] for i in sorted(results)])


@functools.cache
def _page() -> str:
    return resources.files("larcq_ray.search").joinpath("page.html").read_text(encoding="utf-8")


_SEARCH_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SearchRequest.model_json_schema()}},
    }
}


@serve.deployment(name="SearchDeployment")
@serve.ingress(fastapi_app)
class SearchDeployment:
    """One replica: CLAP's text tower and the whole index, loaded once."""

    def __init__(self, cfg) -> None:  # cfg: larcq_ray.config.PipelineConfig
        self.cfg = cfg
        self.serve_cfg = cfg.search.serve
        self.engine = SearchEngine(cfg)
        self._rerank_client = None

    def rerank_client(self):
        """The re-rank service, found on first use (its app may start after this one)."""
        if self._rerank_client is None:
            from larcq_ray.rerank.clients import SERVE_SCHEME, make_client
            from larcq_ray.rerank.config import APP_NAME as RERANK_APP

            endpoint = self.cfg.rerank.endpoint or SERVE_SCHEME + RERANK_APP
            try:
                self._rerank_client = make_client(endpoint, self.cfg.rerank.api_key)
            except LarcqError as e:
                raise ApiError(503, f"re-ranking is unavailable ({e}); run both apps with `larcq-ray serve "
                                    "--search` or set rerank.endpoint", "unavailable", "rerank")
        return self._rerank_client

    @fastapi_app.post("/search", response_model=SearchResponse, openapi_extra=_SEARCH_OPENAPI,
                      responses={c: {"model": ErrorResponse} for c in (400, 401, 413, 422, 500)})
    async def search(self, request: Request) -> SearchResponse:
        sc = self.serve_cfg
        check_bearer(request, sc.api_key)  # before reading a stranger's body
        req = parse_search_request(await read_body(request, sc.max_body_bytes))
        if len(req.query) > sc.max_query_chars:
            raise ApiError(413, f"a query of {len(req.query)} characters is over the limit of {sc.max_query_chars}",
                           "payload_too_large", "query")
        top_k = sc.default_top_k if req.top_k is None else req.top_k
        if top_k > sc.max_top_k:
            raise ApiError(422, f"top_k: {top_k} is over the limit of {sc.max_top_k}", "invalid_request_error",
                           "top_k")
        mode = req.mode or self.engine.default_mode
        if mode not in self.engine.modes:
            raise ApiError(422, f"mode: {mode!r} needs whole-file embeddings, which this index lacks; "
                                f"valid here: {', '.join(self.engine.modes)}", "invalid_request_error", "mode")
        try:
            response = await asyncio.to_thread(self.engine.search, req.query, top_k, mode)
        except LarcqError as e:  # the query itself is unusable (e.g. nothing left after normalizing)
            raise ApiError(422, str(e), "invalid_request_error", "query")
        if req.rerank:
            client = await asyncio.to_thread(self.rerank_client)
            try:
                response = await asyncio.to_thread(self.engine.rerank, response, client)
            except LarcqError as e:  # the re-rank service failed: not the request's fault
                raise ApiError(503, f"re-ranking failed: {e}", "unavailable", "rerank")
        for r in response.results:
            r.audio_url = self.audio_url(r.audio_id)
        return response

    @fastapi_app.get("/healthz", response_model=SearchHealthResponse)
    async def healthz(self) -> Any:
        e = self.engine
        return SearchHealthResponse(status="ok", model=e.model_name, n_audios=e.n_audios, modes=e.modes,
                                    default_mode=e.default_mode, auth_required=self.serve_cfg.api_key is not None,
                                    n_captioned=len(e.captions.timeline) if e.captions else 0)

    @fastapi_app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self, request: Request) -> Any:
        if not request.url.path.endswith("/"):  # the page fetches search/ and healthz relative to itself
            return RedirectResponse(request.url.path + "/", status_code=308)
        return HTMLResponse(_page())

    @fastapi_app.get("/audio/{audio_id:path}", response_class=FileResponse,
                     responses={c: {"model": ErrorResponse} for c in (401, 404)})
    async def audio(self, audio_id: str, request: Request, token: Optional[str] = None) -> Any:
        key = self.serve_cfg.api_key
        if key is not None and not request.headers.get("authorization"):
            why = audio_tokens.check(key, audio_id, token)
            if why:
                raise ApiError(401, why, "authentication_error", "token")
        else:
            check_bearer(request, key)
        path = self.engine.audio_path(audio_id)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type)  # answers Range with 206, a bad range with 416

    def audio_url(self, audio_id: str) -> str:
        sc = self.serve_cfg
        url = f"{sc.route_prefix.rstrip('/')}/audio/{quote(audio_id)}"
        if sc.api_key is not None:
            url += "?token=" + audio_tokens.sign(sc.api_key, audio_id, sc.audio_link_ttl_s)
        return url
