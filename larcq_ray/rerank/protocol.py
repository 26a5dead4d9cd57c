"""Wire format of the /rerank service: the Cohere (v1 and v2) / Jina / vLLM rerank shape.

Request:  {"model"?, "query", "documents": [str | {"text"?: str, <field>: str ...}], "top_n"?,
           "return_documents"?, "rank_fields"?, and the fields those clients send that this server
           accepts without acting on them: max_chunks_per_doc, max_tokens_per_doc, priority,
           truncate_prompt_tokens, user}
Response: {"id", "model", "results": [{"index", "relevance_score", "document"?}], "usage", "meta"}
Errors:   {"error": {"message", "type", "field"}} for every non-2xx answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator


class Document(BaseModel):
    # strict: a number is not silently turned into text. Other fields (Cohere v1's structured
    # documents: title, author, ...) are kept, and ranked on when the request names them in
    # rank_fields; a document without rank_fields must have a text.
    model_config = ConfigDict(extra="allow", strict=True)
    text: Optional[str] = None

    def rank_text(self, fields: Optional[list[str]]) -> str:
        if not fields:
            return self.text or ""
        values = self.model_dump()
        # Cohere ranks "the values in title, author, text sequentially"; the names stay as labels
        return "\n".join(f"{f}: {values[f]}" for f in fields if values.get(f) is not None)


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
    # Cohere v1: rank structured documents on these fields, in this order (default: text)
    rank_fields: Optional[list[str]] = Field(default=None, min_length=1)
    # Sent by the Cohere SDKs, LiteLLM and vLLM's clients; accepted, not acted on: the backend
    # truncates a document to its context itself, and there is one priority.
    max_chunks_per_doc: Optional[int] = Field(default=None, ge=1)
    max_tokens_per_doc: Optional[int] = Field(default=None, ge=1)
    priority: Optional[int] = None
    truncate_prompt_tokens: Optional[int] = None
    user: Optional[str] = None

    @model_validator(mode="after")
    def _texts_to_rank(self) -> "RerankRequest":
        for i, d in enumerate(self.documents):
            if self.rank_fields:
                extra = d.model_dump()
                missing = [f for f in self.rank_fields if f not in extra or extra[f] is None]
                if len(missing) == len(self.rank_fields):
                    raise ValueError(f"documents.{i} has none of the rank_fields {self.rank_fields}")
                bad = [f for f in self.rank_fields if f in extra and not isinstance(extra[f], (str, type(None)))]
                if bad:
                    raise ValueError(f"documents.{i}: rank_fields must name text fields; {bad} are not text")
            elif d.text is None:
                raise ValueError(f"documents.{i} has no text (a structured document needs rank_fields)")
        return self

    def texts(self) -> list[str]:
        """What the backend ranks, one per document."""
        return [d.rank_text(self.rank_fields) for d in self.documents]


class RerankResult(BaseModel):
    index: int  # position in the request's documents
    relevance_score: float  # higher = more relevant; backend-specific scale
    document: Optional[Document] = None


class RerankUsage(BaseModel):
    documents: int
    batch_size: int  # requests scored together in the server batch this one was part of


class BilledUnits(BaseModel):
    search_units: int = 1  # Cohere bills one search unit per request of up to 100 documents


class ApiVersion(BaseModel):
    version: str = "2"


class RerankMeta(BaseModel):
    # What the Cohere SDKs parse (meta.billed_units); nobody is billed here.
    api_version: ApiVersion = Field(default_factory=ApiVersion)
    billed_units: BilledUnits = Field(default_factory=BilledUnits)


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]  # sorted by relevance_score, descending
    usage: RerankUsage
    meta: RerankMeta = Field(default_factory=RerankMeta)


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
