"""The `caption` section: which audio-language model captions, with which prompt and settings,
and which audios."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pydantic

DEFAULT_CAPTION_MODEL = "nvidia/audio-flamingo-3-hf"  # or "Qwen/Qwen2-Audio-7B-Instruct"
DEFAULT_PROMPT = "Describe the sounds in this audio."


class ClapRefineConfig(pydantic.BaseModel):
    """CLAP-Refine (SLAM-AAC): decode once per beam size, keep the candidate whose CLAP text
    embedding is closest to the window's CLAP audio embedding."""

    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    model: str  # a CLAP (hub id or folder; ours from train-clap too)
    beam_sizes: list[int] = pydantic.Field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8], min_length=1)
    adapter: Optional[str] = None  # a LoRA adapter for that CLAP

    @pydantic.field_validator("beam_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("beam sizes must be >= 1")
        return v


class CaptionBackendConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    # hf-audio-lm: an ALM native in transformers (Audio Flamingo 3, Qwen2-Audio);
    # prefix-lm: audio encoder -> connector -> causal LM (SLAM-AAC / SALMONN / GAMA shape);
    # drcap: CLAP embedding projected onto a caption-text support, retrieval-augmented prompt (DRCap).
    kind: Literal["hf-audio-lm", "prefix-lm", "drcap"] = "hf-audio-lm"
    # hf-audio-lm: hub id or folder (transformers format); prefix-lm / drcap: a captioner folder
    # written by `larcq-ray train-captioner`.
    model: str = DEFAULT_CAPTION_MODEL
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
    clap_refine: Optional[ClapRefineConfig] = None  # prefix-lm / drcap: pick among beam-size candidates

    @pydantic.model_validator(mode="after")
    def _refine_needs_candidates(self) -> "CaptionBackendConfig":
        if self.clap_refine is not None and self.kind == "hf-audio-lm":
            raise ValueError("clap_refine works with the prefix-lm and drcap backends (hf-audio-lm returns one caption)")
        return self


class CaptionStageConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    backend: CaptionBackendConfig = pydantic.Field(default_factory=CaptionBackendConfig)
    # Which audios: the ids listed in `audio_ids` (a .txt / .csv / .parquet file; "index": every
    # audio of run_dir/index, e.g. for the search service's rerank), else the top
    # `top_n` of mode `mode`'s shortlist (None: the rerank section's values).
    audio_ids: Optional[str] = None
    mode: Optional[str] = None
    top_n: Optional[int] = pydantic.Field(None, ge=1)
    num_actors: int = pydantic.Field(1, ge=1)
    num_gpus_per_actor: Optional[float] = None  # None: 1 where the cluster has GPUs, else 0


@dataclass(frozen=True)
class BackendSpec:
    """What the caption job needs to know before any actor starts: the backend's name (recorded
    with every caption), its sample rate and its window."""

    name: str
    sample_rate: int
    window_s: float
    prompt: str  # what the model is actually asked (prefix-lm / drcap: the prompt it was trained with)
