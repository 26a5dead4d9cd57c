"""Wire format of the /rerank service: the Cohere / Jina / vLLM rerank shape.

Request:  {"model"?, "query", "documents": [str | {"text": str}], "top_n"?, "return_documents"?}
Response: {"id", "model", "results": [{"index", "relevance_score", "document"?}], "usage"}
Errors:   {"error": {"message", "type", "field"}} for every non-2xx answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints


class Document(BaseModel):
    # strict: a number is not silently turned into text
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str


def _text_to_document(value: Any) -> Any:
    # Plain strings are the common case; wrapping them here (instead of a Union) keeps the
    # pydantic error location clean: "documents.3.text", not "documents.3.str".
    return {"text": value} if isinstance(value, str) else value


DocumentIn = Annotated[Document, BeforeValidator(_text_to_document)]


class RerankRequest(BaseModel):
    # strict: "5" is not a valid top_n and true is not a valid document; clients get told
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Optional[str] = None  # accepted for API compatibility; the server has one model
    query: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    documents: list[DocumentIn] = Field(min_length=1)
    # top_n > len(documents) is clamped (like Cohere / vLLM); < 1 is rejected
    top_n: Optional[int] = Field(default=None, ge=1)
    return_documents: bool = True


class RerankResult(BaseModel):
    index: int  # position in the request's documents
    relevance_score: float  # higher = more relevant; backend-specific scale
    document: Optional[Document] = None


class RerankUsage(BaseModel):
    documents: int
    batch_size: int  # requests scored together in the server batch this one was part of


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]  # sorted by relevance_score, descending
    usage: RerankUsage


ErrorType = Literal[
    "invalid_request_error",  # 400 / 422: body is not JSON or fails validation
    "authentication_error",  # 401
    "not_found_error",  # 404: /search's audio route: no such indexed recording
    "payload_too_large",  # 413: body bytes or document count over the server limits
    "server_error",  # 500: the backend failed on this request
    "unavailable",  # 503: the backend does not answer the health probe
]


class ErrorInfo(BaseModel):
    message: str
    type: ErrorType
    field: Optional[str] = None  # dotted location of the offending field, e.g. "documents.2.text"


class ErrorResponse(BaseModel):
    error: ErrorInfo


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
