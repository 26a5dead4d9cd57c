"""The scoring side of the /rerank service: batching, the backend call, the response.

Knows nothing about HTTP (the router does); one `RerankServing` lives in each Serve replica.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from ray import serve

from larcq_ray.core.devices import free_accelerator_memory, is_out_of_memory
from larcq_ray.rerank.backends import RerankBackend
from larcq_ray.core.service_metrics import ServiceMetrics
from larcq_ray.rerank.protocol import RerankRequest, RerankResponse, RerankResult, RerankUsage

Pair = tuple[str, list[str]]  # (query, documents): one request as the backend sees it


class BackendError(RuntimeError):
    """The backend raised or answered nonsense for one request (-> HTTP 500)."""


@dataclass
class _Scored:
    # serve.batch can only fail a whole batch; carrying the error per request lets one bad
    # request fail alone while the rest of its batch still gets scores.
    scores: Optional[list[float]]
    batch_size: int
    error: Optional[str] = None


class RerankServing:
    """Scores (query, documents) requests with one backend, batching concurrent requests.

    Note: `@serve.batch` keeps one queue per decorated function, so one instance per process
    (one per Serve replica) is the supported use.
    """

    def __init__(
        self,
        backend: RerankBackend,
        *,
        batching: bool = True,
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.01,
        metrics: Optional[ServiceMetrics] = None,
    ) -> None:
        self.backend = backend
        # Batch sizes, backend latency and backend errors (the router records requests). The
        # default is labelled with the replica's Serve app name.
        self.metrics = metrics if metrics is not None else ServiceMetrics(default_app="rerank")
        self.model_name: str = backend.model_name
        self.batching = batching
        # One worker: a single model already uses every core per call; parallel calls only
        # thrash. The event loop stays free to accept and batch the next requests meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-backend")
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _call_backend(self, pairs: list[Pair]) -> list[list[float]]:
        loop = asyncio.get_running_loop()
        scores = await loop.run_in_executor(self._executor, self.backend.score, pairs)
        # A backend answering the wrong shape would otherwise surface as a wrong ranking.
        if len(scores) != len(pairs):
            raise BackendError(f"backend returned {len(scores)} score lists for {len(pairs)} requests")
        out: list[list[float]] = []
        for (_, docs), row in zip(pairs, scores):
            row = [float(s) for s in row]
            if len(row) != len(docs):
                raise BackendError(f"backend returned {len(row)} scores for {len(docs)} documents")
            if not all(math.isfinite(s) for s in row):
                raise BackendError("backend returned a non-finite score")
            out.append(row)
        return out

    async def _timed_call(self, pairs: list[Pair]) -> list[list[float]]:
        """_call_backend for user requests: records the batch size and the backend latency."""
        t0 = time.perf_counter()
        try:
            return await self._call_backend(pairs)
        finally:
            self.metrics.record_batch(len(pairs), time.perf_counter() - t0)

    async def _score_alone(self, pair: Pair, batch_size: int) -> _Scored:
        try:
            return _Scored((await self._timed_call([pair]))[0], batch_size)
        except Exception as e:  # noqa: BLE001 - any backend failure becomes a 500 for this request
            self.metrics.record_error("backend")
            return _Scored(None, batch_size, f"{type(e).__name__}: {e}")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # real values set in __init__
    async def _score_batch(self, pairs: list[Pair]) -> list[_Scored]:
        return await self._score_split(pairs, len(pairs))

    async def _score_split(self, pairs: list[Pair], batch_size: int) -> list[_Scored]:
        """The stage contract's batch rule for a Serve batch: out of GPU memory -> score each half
        again (the built-in backends already halve their own model batches; this covers a batch
        of requests that still does not fit); any other error -> one by one, so only the request
        that breaks the backend fails. Every request gets scores or its own error, none is lost."""
        try:
            rows = await self._timed_call(pairs)
            return [_Scored(row, batch_size) for row in rows]
        except Exception as e:  # noqa: BLE001
            oom = is_out_of_memory(e)
        if len(pairs) == 1:
            return [await self._score_alone(pairs[0], batch_size)]
        if oom:
            free_accelerator_memory()
            half = len(pairs) // 2
            return (await self._score_split(pairs[:half], batch_size)
                    + await self._score_split(pairs[half:], batch_size))
        return [await self._score_alone(p, batch_size) for p in pairs]

    async def score(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """Scores per document and the size of the server batch they were computed in."""
        if self.batching:
            scored = await self._score_batch((query, documents))
        else:
            scored = await self._score_alone((query, documents), 1)
        if scored.error is not None or scored.scores is None:
            raise BackendError(scored.error or "backend returned no scores")
        return scored.scores, scored.batch_size

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        texts = [d.text for d in req.documents]
        scores, batch_size = await self.score(req.query, texts)
        order = sorted(range(len(texts)), key=lambda i: scores[i], reverse=True)
        top_n = min(req.top_n or len(texts), len(texts))  # clamp like Cohere / vLLM
        results = [
            RerankResult(
                index=i,
                relevance_score=scores[i],
                document=req.documents[i] if req.return_documents else None,
            )
            for i in order[:top_n]
        ]
        return RerankResponse(
            id=f"rerank-{uuid.uuid4().hex}",
            model=self.model_name,
            results=results,
            usage=RerankUsage(documents=len(texts), batch_size=batch_size),
        )

    async def probe(self) -> None:
        """Raises when the backend cannot score a tiny request (used by health checks)."""
        # Skips the batch queue: a probe must not join (or fail) a user batch.
        await self._call_backend([("health probe", ["health probe document"])])

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
