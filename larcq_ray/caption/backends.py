"""Caption backends: an audio-language model turns audio windows into short text captions.

An actor calls `build_caption_backend(cfg)` once, then `backend.caption(waveforms)` for each
batch of windows (mono float32 at `backend.sample_rate`, each at most `backend.window_s` long).
Heavy imports (torch, transformers, peft) happen inside the builder.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np
import pydantic

DEFAULT_CAPTION_MODEL = "nvidia/audio-flamingo-3-hf"  # or "Qwen/Qwen2-Audio-7B-Instruct"
DEFAULT_PROMPT = "Describe the sounds in this audio."


class CaptionBackendConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["hf-audio-lm"] = "hf-audio-lm"
    model: str = DEFAULT_CAPTION_MODEL  # hub id or local folder (transformers format)
    adapter: str | None = None  # peft LoRA adapter folder, applied on top of `model`
    prompt: str = DEFAULT_PROMPT
    # Seconds of audio per caption; None -> the most the model takes in one input (its processor's
    # max_audio_len if it has one, else its feature extractor's chunk_length: 30 s for Whisper's).
    window_s: float | None = pydantic.Field(None, gt=0)
    max_new_tokens: int = pydantic.Field(64, ge=1)
    do_sample: bool = False
    num_beams: int = pydantic.Field(1, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = pydantic.Field(4, ge=1)  # windows per generate call
    local_files_only: bool = False  # True: never contact the hub (HF_HUB_OFFLINE=1 does the same)


class CaptionBackend(Protocol):
    name: str  # the model id / folder, recorded with every caption
    sample_rate: int  # what caption() expects
    window_s: float  # longest window caption() should be given

    def caption(self, waveforms: list[np.ndarray]) -> list[str]: ...


def build_caption_backend(cfg: CaptionBackendConfig) -> CaptionBackend:
    if cfg.kind == "hf-audio-lm":
        from larcq_ray.caption.hf_audio_lm import HfAudioLmBackend

        return HfAudioLmBackend(cfg)
    raise AssertionError(f"unknown caption backend kind {cfg.kind!r}")  # pydantic rejects it first
