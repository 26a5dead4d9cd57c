"""`RefineConfig`: everything `run_refine` needs, validated up front (unknown keys are errors)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import pydantic
from pydantic import ConfigDict, Field

from larcq_ray.refine.checks import DEFAULT_MAX_LENGTH_RATIO, DEFAULT_THRESHOLD
from larcq_ray.refine.prompts import DEFAULT_PROMPTS, MODES, check_mode, check_template

DEFAULT_REFINE_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"  # small enough for CPU; the checks guard quality


class RefineConfig(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Which rewrite the pipeline's `refine` stage makes (`larcq-ray refine --mode` overrides it).
    mode: Literal["condense", "rephrase"] | None = None
    engine: Literal["transformers", "vllm"] = "transformers"
    model: str = DEFAULT_REFINE_MODEL  # hub id or local folder
    device: Literal["auto", "cpu", "cuda"] = "auto"  # engine (transformers) and check model
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Per mode; a mode left out gets its default from prompts.py. Each must contain {query}.
    prompts: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy decoding; > 0 = sampling with `seed`
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # sampling only
    seed: int = 0
    batch_size: int = Field(16, ge=1)  # rows per Ray Data batch = prompts per generate call
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0.0)  # set 1 on GPU clusters (transformers engine)
    num_cpus_per_actor: float = Field(1.0, gt=0.0)
    check_model: str | None = None  # sentence-transformers model; None = bundled all-MiniLM-L6-v2
    threshold: float = Field(DEFAULT_THRESHOLD, ge=-1.0, le=1.0)  # min split cosine similarity
    max_length_ratio: float = Field(DEFAULT_MAX_LENGTH_RATIO, gt=0.0)  # rewrite chars / raw chars
    # vllm only: passed to ray.data.llm.vLLMEngineProcessorConfig(engine_kwargs=...)
    vllm_engine_kwargs: dict[str, Any] = {}
    vllm_concurrency: int = Field(1, ge=1)  # vLLM engine replicas (each takes its own GPU(s))
    # Hook (tests, custom engines): "module:callable" or a callable, called with this config,
    # returning an object with `generate(prompts: list[str]) -> list[str]`. Overrides `engine`.
    engine_factory: Any = None

    @pydantic.field_validator("prompts")
    @classmethod
    def _prompts(cls, v: dict[str, str]) -> dict[str, str]:
        for mode in v:
            check_mode(mode)
        merged = {**DEFAULT_PROMPTS, **v}
        for mode, template in merged.items():
            check_template(template, f"refine prompt for {mode!r}")
        return merged

    @pydantic.field_validator("engine_factory")
    @classmethod
    def _factory(cls, v: Any) -> Any:
        if v is None or callable(v) or (isinstance(v, str) and ":" in v):
            return v
        raise ValueError("engine_factory must be a callable or a 'module:callable' string")

    def prompt(self, mode: str) -> str:
        return self.prompts[check_mode(mode)]

    def run_key(self, mode: str) -> str:
        """Hash of every setting that changes a row's result: rows done under another key are redone."""
        factory = self.engine_factory
        if factory is not None and not isinstance(factory, str):
            factory = f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"
        keyed = {
            "mode": mode, "engine": self.engine, "model": self.model, "dtype": self.dtype,
            "prompt": self.prompt(mode), "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "check_model": self.check_model, "threshold": self.threshold,
            "max_length_ratio": self.max_length_ratio, "vllm_engine_kwargs": self.vllm_engine_kwargs,
            "engine_factory": factory,
        }
        return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


__all__ = ["RefineConfig", "DEFAULT_REFINE_MODEL", "MODES"]
