"""HTTP side of the /rerank service: a FastAPI app served as a Ray Serve ingress deployment.

Routes (relative to the application's route_prefix):
  POST /rerank, /v1/rerank, /v2/rerank    one handler, as vLLM serves them: Jina and vLLM clients
                 call /rerank, the Cohere SDKs /v1 and /v2 (Bearer auth when an api_key is set)
                 RerankRequest -> RerankResponse
  GET  /healthz  {"status": "ok", "model": ...} or 503 (no auth: for load-balancer probes)

Every non-2xx answer is an ErrorResponse {"error": {"message", "type", "field"}}:
  400 body is not JSON (or nested too deeply to parse)          401 missing / wrong Bearer token
  413 body over max_body_bytes (Content-Length or actual bytes), or more documents than
      max_documents (field "documents": a server limit, not a schema error)
  422 schema errors, field = dotted pydantic location ("query", "top_n", "documents.2.text")
  500 the backend failed on this request (the replica keeps serving)
  503 the backend does not answer the health probe
top_n > len(documents) is clamped to len(documents), as Cohere and vLLM do.
"""



import hmac
import json
import logging
from typing import Any, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from larcq_ray.rerank.protocol import (
    Document,
    ErrorInfo,
    ErrorResponse,
    ErrorType,
    HealthResponse,
    RerankRequest,
    RerankResponse,
)
from larcq_ray.rerank.config import RerankServeConfig
from larcq_ray.core.service_metrics import install_request_metrics
from larcq_ray.rerank.serving import BackendError, RerankServing

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client as ErrorResponse."""

    def __init__(self, status: int, message: str, type: ErrorType, field: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.field = status, message, type, field


def error_response(status: int, message: str, type: ErrorType, field: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, field=field))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _dotted(loc: Sequence[Any]) -> str:
    # FastAPI prefixes body errors with "body"; clients name fields from the body's root.
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


fastapi_app = FastAPI(
    title="LARCQ rerank",
    description="Re-rank documents (captions) against a query; Cohere / Jina / vLLM rerank shape.",
)


install_request_metrics(fastapi_app, default_app="rerank")


@fastapi_app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.message, exc.type, exc.field, headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # Replaces FastAPI's {"detail": [...]} so every 422 has the same ErrorResponse shape.
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    field = _dotted(first.get("loc", ()))
    message = "; ".join(f"{_dotted(e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)
    return error_response(422, message or "invalid request", "invalid_request_error", field)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # 404 / 405 from routing: same error shape as everything else.
    return error_response(exc.status_code, str(exc.detail), "invalid_request_error")


@fastapi_app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in the rerank service")
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing more than max_bytes before and while reading it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header", "invalid_request_error", "body")
        if size > max_bytes:
            raise ApiError(413, f"body of {size} bytes is over the limit of {max_bytes}",
                           "payload_too_large", "body")
    # The header can lie or be absent (chunked): count what actually arrives too.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"body is over the limit of {max_bytes} bytes",
                           "payload_too_large", "body")
    return bytes(body)


MAX_JSON_DEPTH = 32  # no request of ours nests deeper than 4; deeper bodies are refused before validation


def _depth(text: str) -> int:
    """Deepest bracket nesting outside strings: a linear scan, no recursion."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(body: bytes) -> Any:
    """The body as JSON, or ApiError 400: not UTF-8, not JSON, or nested over MAX_JSON_DEPTH (which
    would otherwise reach Python's recursion limit in the parser or the validator: a 500)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"body is not valid UTF-8: {e}", "invalid_request_error", "body")
    if _depth(text) > MAX_JSON_DEPTH:
        raise ApiError(400, f"body nests JSON deeper than {MAX_JSON_DEPTH} levels", "invalid_request_error", "body")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so are over-long ints
        raise ApiError(400, f"body is not valid JSON: {e}", "invalid_request_error", "body")


def parse_rerank_request(body: bytes, max_documents: int) -> RerankRequest:
    data = parse_json(body)
    try:
        req = RerankRequest.model_validate(data)
    except ValidationError as e:
        # Routed through the same handler as FastAPI's own validation errors.
        raise RequestValidationError(e.errors(include_url=False, include_context=False))
    if len(req.documents) > max_documents:
        raise ApiError(413, f"{len(req.documents)} documents is over the limit of {max_documents}",
                       "payload_too_large", "documents")
    return req


def check_bearer(request: Request, api_key: Optional[str]) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Constant-time comparison: response timing must not leak the key prefix.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                       "authentication_error", "authorization")


# The request body is read by hand (size limits, 400 for non-JSON), so tell OpenAPI its schema.
_RERANK_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RerankRequest.model_json_schema()}},
    }
}


@serve.deployment(name="RerankDeployment")
@serve.ingress(fastapi_app)
class RerankDeployment:
    """One replica: one backend, one batch queue."""

    def __init__(self, cfg: RerankServeConfig) -> None:
        from larcq_ray.rerank.backends import build_backend

        self.cfg = cfg
        self.serving = RerankServing(
            build_backend(cfg.backend),
            batching=cfg.batching,
            max_batch_size=cfg.max_batch_size,
            batch_wait_timeout_s=cfg.batch_wait_timeout_s,
        )

    @fastapi_app.post("/rerank", operation_id="rerank", response_model=RerankResponse, openapi_extra=_RERANK_OPENAPI,
                      responses={c: {"model": ErrorResponse} for c in (400, 401, 413, 422, 500)})
    @fastapi_app.post("/v1/rerank", operation_id="rerank_v1", response_model=RerankResponse, openapi_extra=_RERANK_OPENAPI,
                      responses={c: {"model": ErrorResponse} for c in (400, 401, 413, 422, 500)})
    @fastapi_app.post("/v2/rerank", operation_id="rerank_v2", response_model=RerankResponse, openapi_extra=_RERANK_OPENAPI,
                      responses={c: {"model": ErrorResponse} for c in (400, 401, 413, 422, 500)})
    async def rerank(self, request: Request) -> RerankResponse:
        check_bearer(request, self.cfg.api_key)  # before reading a stranger's body
        body = await read_body(request, self.cfg.max_body_bytes)
        req = parse_rerank_request(body, self.cfg.max_documents)
        # The backend ranks plain texts (rank_fields joined); the answer returns the documents as sent.
        ranked = req.model_copy(update={"documents": [Document(text=t) for t in req.texts()]})
        try:
            response = await self.serving.rerank(ranked)
        except BackendError as e:
            log.warning("backend failed on a rerank request: %s", e)
            raise ApiError(500, f"the rerank backend failed: {e}", "server_error")
        for r in response.results:
            if r.document is not None:
                r.document = req.documents[r.index]
        return response

    @fastapi_app.get("/healthz", response_model=HealthResponse,
                     responses={503: {"model": ErrorResponse}})
    async def healthz(self) -> Any:
        try:
            await self.serving.probe()
        except Exception as e:  # noqa: BLE001 - any failure means "not ready"
            return error_response(503, f"the rerank backend is not healthy: {e}", "unavailable")
        return HealthResponse(status="ok", model=self.serving.model_name)

    async def score(self, query: str, documents: list[str]) -> list[float]:
        """Handle entry point (`handle.score.remote(query, docs)`) for jobs in the same cluster.

        Joins the same batch queue as HTTP requests; no auth, no body limits (in-cluster callers
        are trusted code), but the document cap still holds.
        """
        if not query or not documents:
            raise ValueError("query and documents must not be empty")
        if len(documents) > self.cfg.max_documents:
            raise ValueError(f"{len(documents)} documents is over the limit of {self.cfg.max_documents}")
        scores, _ = await self.serving.score(query, list(documents))
        return scores

    async def check_health(self) -> None:
        # Serve calls this periodically; raising marks the replica unhealthy and restarts it.
        await self.serving.probe()

    def __del__(self) -> None:
        serving = getattr(self, "serving", None)
        if serving is not None:
            serving.close()
