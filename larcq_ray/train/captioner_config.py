"""The `train_captioner` section of the pipeline config (`larcq-ray train-captioner`).

Loading it imports pydantic models only (no torch, no transformers): the captioner configs
(`PrefixLmConfig`, `DrcapConfig`) are plain pydantic classes.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from larcq_ray.caption.drcap import DrcapConfig
from larcq_ray.caption.prefix_lm import PrefixLmConfig

CAPTION_METRICS = ("bleu", "meteor", "rouge_l", "cider_d", "spice")  # larcq_ray.evaluate.caption_metrics.METRICS
# What `select_best` may name: the validation loss (lower is better) or a caption score (higher is better).
SELECT_BEST = ("val_loss", "BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr_D", "SPICE", "SPIDEr")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)


class CaptionerDataConfig(_Strict):
    """Where the (audio, caption) pairs come from: exactly one of captions_csv, provenance, jsonl."""

    # (a) a captions CSV: the Clotho layout (file_name, caption_1..caption_N; + audio_dir, the folder
    # holding the files), or, for kind: drcap only, a text CSV with a `caption` column (no audio).
    captions_csv: Optional[str] = None
    audio_dir: Optional[str] = None  # also: the folder relative jsonl `source` paths are read from
    # (b) a LARCQ benchmark's provenance.parquet: each row the segment [start_s, end_s) of
    # <audios_dir>/<audio_id> with its caption (audios_dir None: <folder of the parquet>/audios).
    provenance: Optional[str] = None
    audios_dir: Optional[str] = None
    # (c) a JSON-lines file: SLAM-AAC's {"key", "source", "target"} (source = the audio path) or
    # DRCap's {"key", "target", "text"} (text only; a `source` makes it usable for prefix-lm too).
    # Relative sources are read from audio_dir, else from the jsonl's folder.
    jsonl: Optional[str] = None
    # Validation: a separate captions CSV (+ val_audio_dir, default audio_dir) or jsonl ...
    val_csv: Optional[str] = None
    val_audio_dir: Optional[str] = None
    val_jsonl: Optional[str] = None
    # ... else this fraction of the training groups (source files, not captions), drawn with `seed`.
    # 0: no validation (captioner_best/ is then the last model).
    val_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    files_per_task: int = Field(8, ge=1)  # clips per feature task (map_batches batch)

    @model_validator(mode="after")
    def _one_source(self) -> "CaptionerDataConfig":
        given = [k for k in ("captions_csv", "provenance", "jsonl") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of captions_csv (+ audio_dir), provenance or jsonl")
        if self.val_csv and self.val_jsonl:
            raise ValueError("give at most one of val_csv or val_jsonl")
        return self


class TrainCaptionerConfig(_Strict):
    # prefix-lm: audio encoder -> connector -> causal LM (SLAM-AAC's shape), trained on (audio, caption);
    # drcap: DRCap, trained on captions alone (CLAP text embeddings stand in for audio).
    kind: Literal["prefix-lm", "drcap"] = "prefix-lm"
    # A fresh captioner (PrefixLmConfig for prefix-lm: encoder, connector, decoder with train:
    # frozen|lora|full, prompt; DrcapConfig for drcap: clap, decoder, prefix_tokens, ...) ...
    model: Optional[Union[PrefixLmConfig, DrcapConfig]] = Field(None, discriminator="kind")
    # ... or a captioner folder (captioner.json, from train-captioner) whose training continues.
    from_: Optional[str] = Field(None, alias="from")
    # Both required by `train-captioner` (optional here so other commands' configs need no section).
    data: Optional[CaptionerDataConfig] = None
    name: str = "train_captioner"  # Ray Train run name: re-running the same name in the same run_dir resumes
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)  # stops earlier than `epochs` when reached
    batch_size: int = Field(8, ge=1)  # per worker
    val_batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)  # linear warm-up of the learning rate, then `lr_schedule`
    # constant, or cosine decay to 0 over the run (epochs x steps per epoch, or max_steps if sooner)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: Optional[float] = Field(1.0, gt=0)
    checkpoint_every_steps: int = Field(100, ge=1)
    # Seconds of audio per training clip; None: the encoder's own input limit (10 s for CLAP, 30 s
    # for Whisper). Longer clips are cut to their first window_s seconds.
    window_s: Optional[float] = Field(None, gt=0)
    # Validation, each epoch (and when max_steps stops a run): the loss over every (clip, caption)
    # pair of the validation set, and caption metrics on captions generated for its first
    # `val_caption_items` clips (0: none). A fresh run also records the loss before training (step 0).
    val_caption_items: int = Field(32, ge=0)
    # prefix-lm with a frozen encoder: run the encoder once per clip (a Ray Data actor pool, GPU
    # where present) and train on its frames (no encoder forward per step; no data augmentation
    # is lost: clips are cut the same way every epoch). Ignored when the encoder trains.
    cache_encoder_frames: bool = True
    val_num_beams: int = Field(1, ge=1)
    val_max_new_tokens: int = Field(32, ge=1)
    metrics: list[Literal["bleu", "meteor", "rouge_l", "cider_d", "spice"]] = Field(
        default_factory=lambda: list(CAPTION_METRICS))
    select_best: Literal["val_loss", "BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr_D", "SPICE", "SPIDEr"] = \
        "val_loss"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: Optional[int] = Field(None, ge=1)
    local_files_only: bool = False  # True: never contact the hub for the encoder / decoder / CLAP
    # Test hook: the loss of this step is made NaN (exercises the NaN stop).
    debug_nan_at_step: Optional[int] = None

    @field_serializer("model")
    def _model_plain(self, model):
        """JSON-plain (DrcapConfig.retrieval_band is a tuple, which yaml.safe_dump refuses)."""
        return model.model_dump(mode="json") if model is not None else None

    @model_validator(mode="before")
    @classmethod
    def _model_kind(cls, data):
        """`model` takes the section's kind unless it names its own."""
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and "kind" not in data["model"]:
            data = {**data, "model": {**data["model"], "kind": data.get("kind", "prefix-lm")}}
        return data

    @model_validator(mode="after")
    def _one_init(self) -> "TrainCaptionerConfig":
        if self.model is not None and self.from_:
            raise ValueError("give exactly one of model (a fresh captioner) or from (a captioner folder)")
        if self.model is not None and self.model.kind != self.kind:
            raise ValueError(f"model.kind {self.model.kind!r} differs from kind {self.kind!r}")
        return self
