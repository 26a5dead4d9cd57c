"""The `train` section of the pipeline config (`larcq-ray train-clap`)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)


class TrainDataConfig(_Strict):
    # (a) Clotho layout: CSV with file_name, caption_1..caption_5 + the folder holding the files.
    captions_csv: Optional[str] = None
    audio_dir: Optional[str] = None
    # (b) a LARCQ benchmark's provenance.parquet (audio_id, position, source_file, caption, start_s,
    # end_s); each row is the segment [start_s, end_s) of <audios_dir>/<audio_id>.
    provenance: Optional[str] = None
    audios_dir: Optional[str] = None  # None: <folder of provenance.parquet>/audios
    # Validation: a separate Clotho-layout CSV (+ its audio folder, default audio_dir) ...
    val_csv: Optional[str] = None
    val_audio_dir: Optional[str] = None
    # ... else this fraction of the training FILES (not pairs), drawn with `seed`. 0: no validation.
    val_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    files_per_task: int = Field(8, ge=1)  # files per feature task (map_batches batch)

    @model_validator(mode="after")
    def _one_source(self) -> "TrainDataConfig":
        if bool(self.captions_csv) == bool(self.provenance):
            raise ValueError("give exactly one of captions_csv (+ audio_dir) or provenance")
        if self.captions_csv and not self.audio_dir:
            raise ValueError("captions_csv needs audio_dir (the folder holding its file_name entries)")
        return self


class InitSizes(_Strict):
    """A fresh (random) CLAP, built by models/fresh_clap.py, with a BPE trained on the training captions."""

    dim: int = Field(64, ge=8)  # text hidden size and projection size
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(2, ge=1)
    audio_depths: list[int] = Field(default_factory=lambda: [1, 1, 1, 1])
    audio_heads: list[int] = Field(default_factory=lambda: [1, 1, 2, 2])
    patch_embeds_hidden_size: int = Field(8, ge=1)
    # HTS-AT patch size (= stride) and attention window: 8 / 4 cut the tokens 4x against 4 / 8.
    audio_patch_size: int = Field(4, ge=1)
    audio_window_size: int = Field(8, ge=1)
    fusion: bool = False
    # A local BERT-family folder (e.g. all-MiniLM-L6-v2) grafted in as the text tower: a real
    # sentence encoder instead of a random one (`dim` stays the projection size; the text_* sizes
    # and vocab_size are then unused).
    text_from: Optional[str] = None
    vocab_size: int = Field(1000, ge=64)
    max_text_tokens: int = Field(77, ge=8)

    @model_validator(mode="after")
    def _shapes(self) -> "InitSizes":
        if len(self.audio_depths) != len(self.audio_heads):
            raise ValueError("audio_depths and audio_heads need the same length")
        if self.dim % self.text_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of text_heads ({self.text_heads})")
        return self


class InitConfig(_Strict):
    # A hub id or a local model folder (config, weights, processor files) ...
    from_: Optional[str] = Field(None, alias="from")
    # ... or the sizes of a fresh model (written to <run_dir>/init_model/ once, reused on resume).
    config: Optional[InitSizes] = None
    seed: int = 0  # weight init of a fresh model
    local_files_only: bool = False

    @model_validator(mode="after")
    def _one_init(self) -> "InitConfig":
        if bool(self.from_) == bool(self.config):
            raise ValueError("give exactly one of init.from (a model) or init.config (sizes of a fresh model)")
        return self


class LoraSection(_Strict):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Suffixes of module names: `query`/`value` are the attention projections of both the
    # RoBERTa text tower and the HTS-AT (Swin) audio tower of transformers' ClapModel.
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"])


class TrainClapConfig(_Strict):
    # Both required by `train-clap` (optional here so other commands' configs need no train section).
    data: Optional[TrainDataConfig] = None
    init: Optional[InitConfig] = None
    lora: LoraSection = Field(default_factory=LoraSection)
    # Parameter-name prefixes kept frozen, e.g. ["text_model.embeddings", "text_model.encoder"]
    # to train only the pooler and projection on top of a grafted sentence encoder.
    freeze: list[str] = Field(default_factory=list)
    # A caption that is also among another batch audio's captions is a positive for it too, not a
    # negative (soft targets). Plain InfoNCE (one positive) when False or when no caption is shared.
    multi_positive: bool = True
    # Learning rates by parameter-name prefix (the longest matching prefix wins; the rest use `lr`),
    # e.g. {"text_model.encoder": 2e-5} for pretrained layers next to a fresh audio tower.
    param_lr: dict[str, float] = Field(default_factory=dict)
    name: str = "train_clap"  # Ray Train run name: re-running the same name in the same run_dir resumes
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)  # stops earlier than `epochs` when reached
    batch_size: int = Field(32, ge=2)  # per worker; InfoNCE negatives are the worker's batch
    val_batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    checkpoint_every_steps: int = Field(100, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: Optional[int] = Field(None, ge=1)
    # Test hook: the loss of this step is made NaN (exercises the NaN stop).
    debug_nan_at_step: Optional[int] = None
