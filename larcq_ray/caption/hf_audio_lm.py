"""Captions from a transformers audio-language model: Audio Flamingo 3, Qwen2-Audio, or a tiny one.

The model class is the one its config names (`architectures`), so any transformers ALM whose
processor takes `text=` + `audio=` works. Prompts come from the processor's chat template: one
user turn holding the audio and the prompt, then the assistant's turn is generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from larcq_ray.caption.config import CaptionBackendConfig
from larcq_ray.core.devices import resolve_device, resolve_dtype
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.ray_session import quiet_weight_loading

# Where each model family expects the prompt relative to the audio in the user turn (its docs' order).
_TEXT_FIRST = ("audioflamingo3", "musicflamingo")


def _missing_model_error(what: str, name: str, err: Exception) -> LarcqError:
    p = Path(name)
    if p.exists():
        where = f"the folder {name} does not hold a complete transformers {what}"
    elif p.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        where = f"no such folder {name}"
    else:
        where = ("it is not a local folder nor in the local Hugging Face cache, and the hub cannot be reached "
                 "(HF_HUB_OFFLINE or no network): download it once with hub access, or give a local folder")
    return LarcqError(f"caption {what} {name!r} could not be loaded: {where} ({type(err).__name__}: {str(err)[:200]})")


def _model_class(config: Any):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and hasattr(cls, "generate"):
            return cls
    for auto in ("AutoModelForMultimodalLM", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText"):
        cls = getattr(transformers, auto, None)
        if cls is not None and type(config) in cls._model_mapping:
            return cls
    raise LarcqError(f"caption model type {config.model_type!r} is not an audio-language model transformers "
                     "can generate text with (expected e.g. audioflamingo3 or qwen2_audio)")


def captioner_name(cfg: CaptionBackendConfig) -> str:
    return f"{cfg.model}+{cfg.adapter}" if cfg.adapter else cfg.model


def load_audio_spec(cfg: CaptionBackendConfig) -> tuple[Any, Any, int, float]:
    """(model config, processor, sample rate, window seconds) without loading the weights.

    The driver calls this to fail fast and to know how to cut windows before any actor starts.
    """
    from transformers import AutoConfig, AutoProcessor

    kw = dict(local_files_only=cfg.local_files_only)
    try:
        config = AutoConfig.from_pretrained(cfg.model, **kw)
        processor = AutoProcessor.from_pretrained(cfg.model, **kw)
    except (OSError, ValueError) as e:
        raise _missing_model_error("model", cfg.model, e) from None
    fe = getattr(processor, "feature_extractor", None)
    if fe is None or not hasattr(processor, "tokenizer"):
        raise LarcqError(f"caption model {cfg.model!r}: its processor has no audio feature extractor; "
                         "is it an audio-language model?")
    # The most one input holds: AF3's processor stacks up to max_audio_len s of 30 s encoder windows;
    # Qwen2-Audio's feature extractor truncates at its chunk_length.
    limit = float(getattr(processor, "max_audio_len", None) or fe.chunk_length)
    if cfg.window_s is not None and cfg.window_s > limit + 1e-6:
        raise LarcqError(f"caption.window_s {cfg.window_s:g} s is longer than {cfg.model!r} takes in one "
                         f"input ({limit:g} s); lower it or leave it unset")
    # Default: the encoder's native window (30 s for Whisper-style encoders), so every part of a
    # long file gets its own caption.
    window_s = float(cfg.window_s if cfg.window_s is not None else fe.chunk_length)
    return config, processor, int(fe.sampling_rate), window_s


class HfAudioLmBackend:
    def __init__(self, cfg: CaptionBackendConfig):
        import torch

        self.cfg = cfg
        self.name = captioner_name(cfg)
        self.prompt = cfg.prompt
        if cfg.adapter and not Path(cfg.adapter).is_dir():
            raise LarcqError(f"caption.adapter {cfg.adapter!r} is not a folder (expected a peft LoRA adapter)")
        config, self.processor, self.sample_rate, self.window_s = load_audio_spec(cfg)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues from the right
        self._text_first = config.model_type in _TEXT_FIRST

        self.device = torch.device(resolve_device(cfg.device, "caption.backend.device"))
        self.dtype = getattr(torch, resolve_dtype(cfg.dtype, self.device.type))
        cls = _model_class(config)
        quiet_weight_loading()  # a Ray actor: its "Loading weights" bar would reach the driver's console
        try:
            model = cls.from_pretrained(cfg.model, dtype=self.dtype, local_files_only=cfg.local_files_only)
        except OSError as e:
            raise _missing_model_error("model", cfg.model, e) from None
        if cfg.adapter:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, cfg.adapter)
            except (OSError, ValueError) as e:
                raise _missing_model_error("adapter", cfg.adapter, e) from None
        self.model = model.to(self.device).eval()
        tok = self.processor.tokenizer
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _prompts(self, n: int) -> list[str]:
        audio = {"type": "audio"}
        text = {"type": "text", "text": self.prompt}
        turn = [{"role": "user", "content": [text, audio] if self._text_first else [audio, text]}]
        if getattr(self.processor, "chat_template", None):
            rendered = self.processor.apply_chat_template([turn] * n, add_generation_prompt=True, tokenize=False)
            return list(rendered) if isinstance(rendered, list) else [rendered] * n
        token = getattr(self.processor, "audio_token", "<audio>")  # no template: audio token + prompt
        return [f"{token}{self.prompt}"] * n

    def caption(self, waveforms: list[np.ndarray]) -> list[str]:
        out: list[str] = []
        bs = self.cfg.batch_size
        for i in range(0, len(waveforms), bs):
            out.extend(self._caption_batch([np.asarray(w, dtype=np.float32) for w in waveforms[i:i + bs]]))
        return out

    def _caption_batch(self, waves: list[np.ndarray]) -> list[str]:
        import torch

        inputs = self.processor(text=self._prompts(len(waves)), audio=waves, sampling_rate=self.sample_rate,
                                padding=True, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            gen = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=self.cfg.do_sample,
                                      num_beams=self.cfg.num_beams, pad_token_id=self._pad_id)
        new = gen[:, inputs["input_ids"].shape[1]:]  # decoder-only: the prompt is echoed first
        texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts]
