"""Pipeline configuration: one YAML file, validated strictly. Each section's class lives with its
stage (index/config.py, search/config.py, ...); this module puts them together.

Every section forbids unknown keys, so a typo is an error naming the key rather
than a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from larcq_ray.caption.config import CaptionStageConfig
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.inputs import DataConfig
from larcq_ray.core.ray_session import RayConfig
from larcq_ray.evaluate.alm_config import EvalAlmConfig
from larcq_ray.index.config import IndexConfig
from larcq_ray.models.config import ModelConfig
from larcq_ray.refine.config import RefineConfig
from larcq_ray.rerank.config import RerankJobConfig, RerankServeConfig
from larcq_ray.search.config import SearchConfig
from larcq_ray.synthesize.config import SynthesizeConfig
from larcq_ray.train.captioner_config import TrainCaptionerConfig
from larcq_ray.train.config import TrainClapConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


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
    train_captioner: TrainCaptionerConfig = Field(default_factory=TrainCaptionerConfig)
    eval_alm: EvalAlmConfig = Field(default_factory=EvalAlmConfig)  # `larcq-ray eval-alm` (with caption.backend)


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
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
