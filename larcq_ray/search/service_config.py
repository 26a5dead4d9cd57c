"""The `search.serve` section: the online /search service (plain pydantic: loading a config stays cheap)."""

from __future__ import annotations

import os
from typing import Optional

import pydantic
from pydantic import BaseModel, ConfigDict, Field

API_KEY_ENV = "LARCQ_SEARCH_API_KEY"
APP_NAME = "larcq-search"


class SearchServeConfig(BaseModel):
    """`larcq-ray serve-search`: CLAP's text tower and run_dir/index loaded once per replica."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"  # loopback unless asked: the service has no auth by default
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    max_ongoing_requests: int = Field(16, ge=1)
    max_body_bytes: int = Field(100_000, ge=1)
    max_query_chars: int = Field(4000, ge=1)  # longer queries: 413 (the text tower truncates anyway)
    max_top_k: int = Field(100, ge=1)  # top_k over this: 422
    default_top_k: int = Field(10, ge=1)
    # the mode used when a request names none; None -> search.report_mode()
    default_mode: Optional[str] = None
    # captions for `rerank: true` (a captions.parquet); None: run_dir's, if the caption job wrote one
    captions: Optional[str] = None
    # lifetime of the signed audio links in /search answers when an api_key is set
    audio_link_ttl_s: int = Field(900, ge=1)
    # None: taken from $LARCQ_SEARCH_API_KEY where the config is built (driver / Serve controller)
    api_key: Optional[str] = None
    # a replica not running by then (no node has its CPUs, or loading hangs): an error naming what
    # Serve waits for, not a wait forever
    start_timeout_s: float = Field(1800.0, gt=0)

    @pydantic.field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        return v

    @pydantic.model_validator(mode="after")
    def _check(self) -> "SearchServeConfig":
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"default_top_k {self.default_top_k} is over max_top_k {self.max_top_k}")
        if not self.api_key:
            self.api_key = os.environ.get(API_KEY_ENV) or None  # "" means no auth, not key ""
        return self
