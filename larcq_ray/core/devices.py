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
