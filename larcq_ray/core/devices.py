"""Where a model runs: one rule for every stage (CLAP, captioner, re-ranker)."""

from __future__ import annotations

from larcq_ray.core.errors import LarcqError


def resolve_device(device: str, setting: str = "device") -> str:
    """"auto" -> cuda when this worker sees a GPU, else cpu; "cuda" without a GPU is a clear error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LarcqError(f"{setting} is 'cuda' but this worker has no CUDA GPU; use auto or cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" -> bfloat16 on a GPU, float32 on CPU (CPU bf16 matmuls are slow and lossy here)."""
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype
