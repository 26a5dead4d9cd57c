"""Caption backends: an audio-language model turns audio windows into short text captions.

An actor calls `build_caption_backend(cfg)` once, then `backend.caption(waveforms)` for each
batch of windows (mono float32 at `backend.sample_rate`, each at most `backend.window_s` long).
Heavy imports (torch, transformers, peft) happen inside the builder.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from larcq_ray.caption.config import CaptionBackendConfig



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
