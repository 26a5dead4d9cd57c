"""A causal LM that reads a prefix of embeddings and writes a caption: the decoder half of the
prefix-lm and drcap captioners.

One sequence per item, left-padded so that every row of a batch ends at the same position:

    [text before]  [prefix embeddings]  [prompt]  ->  caption (+ eos)

`text before` is DRCap's retrieved similar captions (empty for prefix-lm); the prompt is the
instruction ("USER: Describe the audio you hear.\\n ASSISTANT:"). Training appends the target
caption and masks everything else out of the loss. Any transformers causal LM by hub id or folder,
optionally with a peft LoRA adapter, optionally 4-bit (bitsandbytes, CUDA only).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import pydantic

from larcq_ray.core.errors import LarcqError

DEFAULT_PROMPT = "USER: Describe the audio you hear.\n ASSISTANT:"


class LoraSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    r: int = pydantic.Field(8, ge=1)
    alpha: int = pydantic.Field(16, ge=1)
    dropout: float = pydantic.Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = pydantic.Field(default_factory=lambda: ["q_proj", "v_proj"])


class DecoderSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    name_or_path: str  # a transformers causal LM: hub id or folder (Vicuna-7B, Llama, Qwen2.5, a tiny one)
    # What training changes: nothing (frozen), a LoRA adapter (SLAM-AAC's recipe), or every weight.
    train: Literal["frozen", "lora", "full"] = "lora"
    lora: LoraSpec = pydantic.Field(default_factory=LoraSpec)
    load_in_4bit: bool = False  # bitsandbytes NF4 (CUDA only); unverified until a GPU run exercises it


def load_decoder(spec: DecoderSpec, *, dtype, device, adapter_dir: Optional[str] = None,
                 full_dir: Optional[str] = None, trainable: bool = False, local_files_only: bool = False):
    """(tokenizer, model). `full_dir`: a fully trained decoder saved with the captioner (replaces
    spec.name_or_path); `adapter_dir`: a trained LoRA adapter; `trainable`: attach a fresh LoRA
    (train: lora) or unfreeze everything (train: full)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from larcq_ray.core.ray_session import quiet_weight_loading

    quiet_weight_loading()
    source = full_dir or spec.name_or_path
    kw: dict[str, Any] = dict(local_files_only=local_files_only)
    if spec.load_in_4bit:
        if not torch.cuda.is_available():
            raise LarcqError("decoder.load_in_4bit needs a CUDA GPU (bitsandbytes); this worker has none")
        try:
            from transformers import BitsAndBytesConfig
        except ImportError:  # pragma: no cover - old transformers
            raise LarcqError("decoder.load_in_4bit needs transformers' BitsAndBytesConfig") from None
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise LarcqError(f"could not load the caption decoder {source!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not spec.load_in_4bit:
        model = model.to(device)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    elif trainable and spec.train == "lora":
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in spec.lora.target_modules if m not in names]
        if missing:
            raise LarcqError(f"decoder.lora.target_modules {missing} name no module of {source!r} "
                             f"(e.g. {sorted(n for n in names if 'proj' in n)[:8]})")
        model = get_peft_model(model, LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha,
                                                 lora_dropout=spec.lora.dropout,
                                                 target_modules=spec.lora.target_modules, task_type="CAUSAL_LM"))
    for p in model.parameters():
        p.requires_grad = False
    if trainable and spec.train == "full":
        for p in model.parameters():
            p.requires_grad = True
    elif trainable and spec.train == "lora":
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad = True
    return tokenizer, model


def hidden_size(model) -> int:
    return int(model.get_input_embeddings().embedding_dim)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def build_inputs(model, tokenizer, prefix, prompt: str, before: Optional[list[str]] = None,
                 targets: Optional[list[str]] = None):
    """(inputs_embeds, attention_mask, position_ids, labels or None) for a batch.

    prefix: (B, P, D) tensor on the model's device. The part up to the prompt is left-padded;
    targets (training) follow, right-padded, and only they count in the loss.
    """
    import torch

    b = prefix.shape[0]
    before = before if before is not None else [""] * b
    emb = model.get_input_embeddings()
    dev = prefix.device
    prompt_ids = _ids(tokenizer, prompt)
    eos = tokenizer.eos_token_id
    heads, tails = [], []
    for i in range(b):
        pre = torch.as_tensor(_ids(tokenizer, before[i]), dtype=torch.long, device=dev)
        post = torch.as_tensor(prompt_ids, dtype=torch.long, device=dev)
        head = torch.cat([emb(pre), prefix[i].to(emb.weight.dtype), emb(post)], dim=0)
        heads.append(head)
        if targets is not None:
            ids = _ids(tokenizer, " " + targets[i].strip()) + ([eos] if eos is not None else [])
            tails.append(torch.as_tensor(ids, dtype=torch.long, device=dev))
    h_len = max(h.shape[0] for h in heads)
    t_len = max((t.shape[0] for t in tails), default=0)
    d = heads[0].shape[1]
    embeds = torch.zeros(b, h_len + t_len, d, dtype=heads[0].dtype, device=dev)
    mask = torch.zeros(b, h_len + t_len, dtype=torch.long, device=dev)
    labels = torch.full((b, h_len + t_len), -100, dtype=torch.long, device=dev) if targets is not None else None
    for i, h in enumerate(heads):
        embeds[i, h_len - h.shape[0]:h_len] = h
        mask[i, h_len - h.shape[0]:h_len] = 1
        if targets is not None:
            t = tails[i]
            embeds[i, h_len:h_len + len(t)] = emb(t)
            mask[i, h_len:h_len + len(t)] = 1
            labels[i, h_len:h_len + len(t)] = t
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return embeds, mask, position_ids, labels


def decoder_loss(model, tokenizer, prefix, prompt: str, targets: list[str], before: Optional[list[str]] = None):
    embeds, mask, pos, labels = build_inputs(model, tokenizer, prefix, prompt, before, targets)
    return model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, labels=labels).loss


def decoder_generate(model, tokenizer, prefix, prompt: str, before: Optional[list[str]] = None, *,
                     num_beams: int = 1, max_new_tokens: int = 32, do_sample: bool = False) -> list[str]:
    import torch

    with torch.inference_mode():  # the inputs too: no autograd graph even when the decoder is trainable
        embeds, mask, _, _ = build_inputs(model, tokenizer, prefix, prompt, before)
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                             num_beams=num_beams, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    # With inputs_embeds a decoder-only model returns only the new tokens.
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
