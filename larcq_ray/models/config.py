"""The `model` section: which CLAP embeds audio and text (index, search, training's base)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    name_or_path: str = "laion/clap-htsat-fused"
    # "auto": cuda when the worker has a GPU, else cpu.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto": bfloat16 on a GPU (float16 where it has no bf16), float32 on CPU (core/devices.py)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    # Seed for CLAP fusion crops, so a long file always gets the same embedding.
    fusion_seed: int = 0
    local_files_only: bool = False
    # A peft (LoRA) adapter folder (e.g. <train run_dir>/adapter_best) merged into the model on load.
    adapter: Optional[str] = None
