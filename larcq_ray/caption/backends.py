"""Caption backends: an audio-language model turns audio windows into short text captions.

An actor calls `build_caption_backend(cfg)` once, then `backend.caption(waveforms)` for each
batch of windows (mono float32 at `backend.sample_rate`, each at most `backend.window_s` long).
Heavy imports (torch, transformers, peft) happen inside the builder.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from larcq_ray.caption.config import BackendSpec, CaptionBackendConfig



class CaptionBackend(Protocol):
    name: str  # the model id / folder, recorded with every caption
    sample_rate: int  # what caption() expects
    window_s: float  # longest window caption() should be given

    def caption(self, waveforms: list[np.ndarray]) -> list[str]: ...


def describe(cfg: CaptionBackendConfig) -> BackendSpec:
    """Without loading weights: fails fast on a missing model, before Ray starts."""
    if cfg.kind == "hf-audio-lm":
        from larcq_ray.caption.hf_audio_lm import captioner_name, load_audio_spec

        _, _, sample_rate, window_s = load_audio_spec(cfg)
        return BackendSpec(captioner_name(cfg), sample_rate, window_s, cfg.prompt)
    if cfg.kind == "prefix-lm":
        from larcq_ray.caption.prefix_lm import describe_folder

        return describe_folder(cfg)
    if cfg.kind == "drcap":
        from larcq_ray.caption.drcap import describe_folder

        return describe_folder(cfg)
    raise AssertionError(f"unknown caption backend kind {cfg.kind!r}")  # pydantic rejects it first


def build_caption_backend(cfg: CaptionBackendConfig) -> CaptionBackend:
    if cfg.kind == "hf-audio-lm":
        from larcq_ray.caption.hf_audio_lm import HfAudioLmBackend

        return HfAudioLmBackend(cfg)
    if cfg.kind == "prefix-lm":
        from larcq_ray.caption.prefix_lm import PrefixLmBackend

        return PrefixLmBackend(cfg)
    if cfg.kind == "drcap":
        from larcq_ray.caption.drcap import DrcapBackend

        return DrcapBackend(cfg)
    raise AssertionError(f"unknown caption backend kind {cfg.kind!r}")  # pydantic rejects it first
