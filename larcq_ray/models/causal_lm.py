"""Causal LM plumbing shared by every stage that runs a transformers LM on text prompts.

Used by the listwise re-ranker (`rerank/backends.py`) and the query refiner (`refine/engines.py`):
one way to load a model + tokenizer ready for batched left-padded inference, one way to turn a
user prompt into model text. Heavy imports stay inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from larcq_ray.core.devices import resolve_device, resolve_dtype
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.ray_session import quiet_weight_loading

if TYPE_CHECKING:  # pragma: no cover
    import torch


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise LarcqError(f"unknown dtype {name!r}: use float32, float16 or bfloat16") from None


def load_causal_lm(model_name: str, dtype: str = "float32", device: str = "auto",
                   what: str = "causal LM", setting: str = "device") -> tuple[Any, Any, str]:
    """(tokenizer, model, device) for `model_name` (hub id or local folder).

    The model is in eval mode on the resolved device; the tokenizer pads on the LEFT (so the last
    position of every row of a batch is its real last token) and has a pad token (eos if none).
    `what` names the model in the error message, `setting` names the device setting.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device, setting)
    quiet_weight_loading()  # runs in Ray actors / Serve replicas: no "Loading weights" bar per load
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        # "auto" resolved by the one rule (core/devices.py): bf16 on a GPU, float32 on CPU
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch_dtype(resolve_dtype(dtype, dev)))
    except (OSError, ValueError) as exc:
        raise LarcqError(f"could not load the {what} {model_name!r}: {exc}") from exc
    model.to(dev).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model, dev


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer: Any, prompt: str) -> str:
    """Chat template (user turn + assistant start) if the tokenizer has one, else prompt + newline."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def check_prompt_template(template: object, fields: tuple[str, ...], name: str) -> str:
    """`template` must contain every {field} and format with those alone; returned unchanged.

    Shared by the re-ranker's listwise prompt and refine's prompts, so both reject the same
    mistakes (a missing placeholder, stray single braces) with the same message.
    """
    wanted = " and ".join("{" + f + "}" for f in fields)
    if not isinstance(template, str) or any("{" + f + "}" not in template for f in fields):
        raise LarcqError(f"{name} must contain the placeholder(s) {wanted}")
    try:
        template.format(**{f: "" for f in fields})
    except (KeyError, IndexError, ValueError) as exc:
        raise LarcqError(f"{name} does not format with {wanted} alone ({exc!r}); "
                         "double literal braces as {{ }}") from exc
    return template

