"""How the re-rank job reaches the /rerank service: over HTTP (any Cohere/Jina/vLLM-shaped endpoint)
or through a Serve handle to an app in the same Ray cluster."""

from __future__ import annotations

from typing import Protocol

from larcq_ray.core.errors import LarcqError


class TooManyDocuments(LarcqError):
    """The service refused a request for its number of documents (HTTP 413 on `documents`)."""


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
                err = r.json()["error"]
                msg, field = err["message"], err.get("field")
            except Exception:  # noqa: BLE001 - any non-JSON error body
                msg, field = r.text[:200], None
            if r.status_code == 413 and field == "documents":
                raise TooManyDocuments(f"re-rank service at {self.url}: {msg}")
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
            if "documents is over the limit" in str(e):
                raise TooManyDocuments(f"re-rank app {self.app_name!r}: {lines[-1]}") from e
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
