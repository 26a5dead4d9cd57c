"""The `caption` section: which audio-language model captions, with which prompt and settings,
and which audios."""

from __future__ import annotations

from typing import Literal, Optional

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


class CaptionStageConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", protected_namespaces=())

    backend: CaptionBackendConfig = pydantic.Field(default_factory=CaptionBackendConfig)
    # Which audios: the ids listed in `audio_ids` (a .txt / .csv / .parquet file), else the top
    # `top_n` of mode `mode`'s shortlist (None: the rerank section's values).
    audio_ids: Optional[str] = None
    mode: Optional[str] = None
    top_n: Optional[int] = pydantic.Field(None, ge=1)
    num_actors: int = pydantic.Field(1, ge=1)
    num_gpus_per_actor: Optional[float] = None  # None: 1 where the cluster has GPUs, else 0
