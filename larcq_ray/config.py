"""Pipeline configuration: one YAML file, validated strictly.

Every section forbids unknown keys, so a typo is an error naming the key rather
than a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from larcq_ray.errors import LarcqError
from larcq_ray.caption.backends import CaptionBackendConfig
from larcq_ray.rerank.app import RerankServeConfig
from larcq_ray.rerank_job import RerankJobConfig
from larcq_ray.scoring import MODES
from larcq_ray.refine.config import RefineConfig
from larcq_ray.synthesis.config import SynthesizeConfig
from larcq_ray.train.config import TrainClapConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Strict):
    # LARCQ layout: <benchmark>/queries.csv and <benchmark>/audios/<audio_id>.
    benchmark: Optional[str] = None
    # A corpus without queries: a folder, a text file listing paths (one per line), or a glob.
    corpus: Optional[str] = None
    # Overrides <benchmark>/queries.csv.
    queries_csv: Optional[str] = None
    extensions: list[str] = Field(default_factory=lambda: ["wav", "flac", "ogg", "mp3"])


class ModelConfig(_Strict):
    name_or_path: str = "laion/clap-htsat-fused"
    # "auto": cuda when the worker has a GPU, else cpu.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Seed for CLAP fusion crops, so a long file always gets the same embedding.
    fusion_seed: int = 0
    local_files_only: bool = False
    # A peft (LoRA) adapter folder (e.g. <train run_dir>/adapter_best) merged into the model on load.
    adapter: Optional[str] = None


class ChunkingConfig(_Strict):
    mode: Literal["fixed", "equal", "none"] = "fixed"
    window_s: float = Field(10.0, gt=0)
    overlap_s: float = Field(0.0, ge=0)
    # A trailing partial window shorter than this is dropped (unless it is the only one):
    # a 10 ms tail repeat-padded to 10 s is noise that can win a max vote.
    min_chunk_s: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _overlap_below_window(self) -> "ChunkingConfig":
        if self.overlap_s >= self.window_s:
            raise ValueError(f"overlap_s ({self.overlap_s}) must be smaller than window_s ({self.window_s})")
        return self


class IndexConfig(_Strict):
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    # Also embed each whole file (CLAP fusion), needed by the `none` and `query-*` modes.
    whole_file: bool = True
    batch_size: int = Field(16, ge=1)  # chunks per model forward
    num_actors: int = Field(1, ge=1)  # embedding actor pool size
    num_gpus_per_actor: Optional[float] = None  # None: 1 where the cluster has GPUs, else 0
    num_cpus_per_actor: float = Field(1.0, gt=0)
    torch_threads: Optional[int] = None  # CPU actors; None: cores of the node / num_actors
    files_per_decode_task: int = Field(4, ge=1)
    decode_memory_mb: int = Field(512, ge=1)  # memory reserved per decode task
    commit_every_files: int = Field(64, ge=1)  # files per committed Parquet part
    silence_threshold_db: float = -80.0  # peak below this (dBFS) = silent file


class SearchConfig(_Strict):
    query_chunking: Literal["columns", "sentences", "none"] = "columns"
    modes: list[str] = Field(default_factory=lambda: list(MODES))
    top_k: int = Field(100, ge=1)
    query_block: int = Field(256, ge=1)
    chunk_block: int = Field(65536, ge=1)
    text_batch_size: int = Field(64, ge=1)
    retrieved_csv_k: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _known_modes(self) -> "SearchConfig":
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown scoring mode(s) {bad}; valid: {list(MODES)}")
        if not self.modes:
            raise ValueError("at least one scoring mode is needed")
        return self


class RayConfig(_Strict):
    # None: $RAY_ADDRESS, or the cluster a submitted job runs in, or a new local Ray.
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # local Ray only; None: all cores


class CaptionStageConfig(_Strict):
    backend: CaptionBackendConfig = Field(default_factory=CaptionBackendConfig)
    # Which audios: the ids listed in `audio_ids` (a .txt / .csv / .parquet file), else the top
    # `top_n` of mode `mode`'s shortlist (None: the rerank section's values).
    audio_ids: Optional[str] = None
    mode: Optional[str] = None
    top_n: Optional[int] = Field(None, ge=1)
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: Optional[float] = None  # None: 1 where the cluster has GPUs, else 0


# Pipeline order. `run` does the config's `stages` (default: the retrieval ones); the benchmark
# job (`larcq-ray benchmark`) does them all, building the benchmark first.
ALL_STAGES = ("synthesize", "refine", "index", "search", "caption", "rerank", "evaluate")
STAGES = ALL_STAGES[2:]


class PipelineConfig(_Strict):
    # A local path or a pyarrow filesystem URI (s3://bucket/run, gs://..., file://...).
    run_dir: str = "runs/default"
    # What `larcq-ray run` does, in this order (a subset of ALL_STAGES).
    stages: list[Literal["synthesize", "refine", "index", "search", "caption", "rerank", "evaluate"]] = Field(
        default_factory=lambda: list(STAGES))
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    caption: CaptionStageConfig = Field(default_factory=CaptionStageConfig)
    rerank: RerankJobConfig = Field(default_factory=RerankJobConfig)
    serve: RerankServeConfig = Field(default_factory=RerankServeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    train: TrainClapConfig = Field(default_factory=TrainClapConfig)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key")
        else:
            lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def _apply_override(raw: dict, dotted: str) -> None:
    """`index.batch_size=8` -> raw["index"]["batch_size"] = 8 (value parsed as YAML)."""
    if "=" not in dotted:
        raise LarcqError(f"--set expects KEY=VALUE, got {dotted!r}")
    key, value = dotted.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise LarcqError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PipelineConfig:
    raw: dict = {}
    source = "(defaults)"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise LarcqError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise LarcqError(f"config {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise LarcqError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    for o in overrides:
        _apply_override(raw, o)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise LarcqError(_format_validation_error(e, source)) from None


def dump_config(cfg: PipelineConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
