"""Where a model runs and in which precision: one rule for every stage (CLAP, captioner, re-ranker),
and the one out-of-memory rule (split the work in halves and retry; a single row that still does
not fit is the caller's failure to report).

- `resolve_device`: "auto" -> cuda when this worker sees a GPU, else cpu; "cuda" without a GPU is
  a LarcqError naming the setting (never a CUDA traceback from deep inside a model load).
- `resolve_dtype`: "auto" -> bfloat16 on a GPU, float32 on CPU; an explicit dtype is kept, except
  bfloat16 / float16 on a GPU that cannot run them, which is a LarcqError.
- `is_out_of_memory`, `free_accelerator_memory`, `split_on_oom`: used by the Ray Data batch rule
  (core/stage.py run_batch) and by the re-rank backends, which are not Ray Data stages.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from larcq_ray.core.errors import LarcqError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
T = TypeVar("T")
R = TypeVar("R")


def resolve_device(device: str, setting: str = "device") -> str:
    """"auto" -> cuda when this worker sees a GPU, else cpu; "cuda" without a GPU is a clear error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LarcqError(f"{setting} is {device!r} but this worker has no CUDA GPU (torch sees none); "
                         "use auto or cpu, or give the stage a GPU (its num_gpus / gpus setting)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise LarcqError(f"{setting} is {device!r}: use auto, cpu or cuda")
    return device


def resolve_dtype(dtype: str, device: str, setting: str = "dtype") -> str:
    """"auto" -> bfloat16 on a GPU, float32 on CPU (CPU bf16 matmuls are slow and lossy here).

    `device` is a resolved device ("cpu", "cuda", "cuda:1") or a torch.device's type."""
    device = str(device)
    if dtype == "auto":
        if device.startswith("cuda"):
            import torch

            # bf16 needs Ampere or newer; older GPUs (T4, V100) run float16 instead.
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in DTYPES:
        raise LarcqError(f"{setting} is {dtype!r}: use auto, float32, float16 or bfloat16")
    if dtype == "bfloat16" and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_bf16_supported():
            raise LarcqError(f"{setting} is bfloat16 but this GPU cannot run it; use float16 or auto")
    return dtype


def torch_dtype(dtype: str, device: str = "cpu", setting: str = "dtype") -> "torch.dtype":
    """The torch dtype for a config's dtype (auto resolved for `device`)."""
    import torch

    return getattr(torch, resolve_dtype(dtype, device, setting))


# -- out of memory ---------------------------------------------------------------------------------

_OOM_TEXT = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
             "failed to allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (or any class of that name, a subclass too), MemoryError, or an
    error whose text says the device or host ran out of memory; also when such an error is the
    cause of `exc` (a library re-raising it wrapped)."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__):
            return True
        text = str(e).lower()
        if any(t in text for t in _OOM_TEXT):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def free_accelerator_memory() -> None:
    """Return cached blocks to the GPU after an out-of-memory, before the retry."""
    import gc

    gc.collect()  # the failed call's activations may sit in reference cycles (tracebacks, closures)
    torch = sys.modules.get("torch")  # only if the stage imported it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_on_oom(fn: Callable[[Sequence[T]], Sequence[R]], items: Sequence[T], what: str = "batch") -> list[R]:
    """`fn(items)` (one result per item, in order); on out of memory the items are split in halves
    and each half retried, down to single items. A single item that still does not fit re-raises
    the out-of-memory error; any other error re-raises at once."""
    if not len(items):
        return []
    try:
        out = list(fn(items))
    except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raise
        if len(items) <= 1 or not is_out_of_memory(e):
            raise
        oom = f"{type(e).__name__}"
    else:
        if len(out) != len(items):
            raise RuntimeError(f"{what}: {len(out)} results for {len(items)} items")
        return out
    # Out of the except block: the exception's traceback (frames holding GPU tensors) is released.
    free_accelerator_memory()
    half = len(items) // 2
    log.debug("%s: out of memory (%s) on %d items; retrying as %d + %d", what, oom, len(items), half,
              len(items) - half)
    return split_on_oom(fn, items[:half], what) + split_on_oom(fn, items[half:], what)
