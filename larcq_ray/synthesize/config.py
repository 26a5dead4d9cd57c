"""What `larcq-ray synthesize` builds: the `synthesize:` section of the pipeline config."""

from __future__ import annotations

from typing import Literal, Optional, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field

CLOTHO_CAPTIONS = [f"caption_{i}" for i in range(1, 6)]


class SynthesizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Source: a captions CSV (Clotho: file_name, caption_1 ... caption_5) and its audio folder.
    # Both may be local paths or pyarrow filesystem URIs (s3://...).
    captions_csv: Optional[str] = None
    audio_dir: Optional[str] = None
    file_column: str = "file_name"
    caption_columns: list[str] = Field(default_factory=lambda: list(CLOTHO_CAPTIONS), min_length=1)
    # Which caption describes a clip in the query and its split column: one of caption_columns,
    # or "random" (a seeded draw among the clip's non-empty captions).
    query_caption: str = "caption_1"

    # Output: the LARCQ layout (queries.csv, audios/) plus provenance.parquet, here.
    out_dir: Optional[str] = None
    n_audios: int = Field(1000, ge=1)
    # Clips per long audio: a number, or [min, max] drawn per audio.
    clips_per_audio: Union[int, tuple[int, int]] = 5
    seed: int = 0
    # Between clips: `gap_s` of silence, or a `crossfade_s` equal-power crossfade (not both).
    gap_s: float = Field(0.0, ge=0)
    crossfade_s: float = Field(0.0, ge=0)
    # Total duration bounds of one long audio (seconds); draws outside are redrawn.
    min_duration_s: Optional[float] = Field(None, gt=0)
    max_duration_s: Optional[float] = Field(None, gt=0)
    # A clip is never used twice in one long audio; this caps its uses across the benchmark.
    max_clip_uses: Optional[int] = Field(None, ge=1)
    # None: the clips' own rate (the most common one when they differ; the others are resampled).
    sample_rate: Optional[int] = Field(None, ge=8000, le=384000)
    subtype: Literal["PCM_16", "PCM_24", "FLOAT"] = "PCM_16"
    audio_id_prefix: str = "larcq_"
    max_draws: int = Field(1000, ge=1)  # redraws per long audio before its constraints count as impossible
    commit_every: int = Field(16, ge=1)  # long audios per progress record (what a resume keeps)
    num_workers: Optional[int] = Field(None, ge=1)  # concurrent render tasks; None: as many as CPUs

    @pydantic.field_validator("clips_per_audio")
    @classmethod
    def _clips(cls, v):
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError("clips_per_audio must be >= 1, or [min, max] with 1 <= min <= max")
        return v

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> "SynthesizeConfig":
        if self.gap_s > 0 and self.crossfade_s > 0:
            raise ValueError("gap_s and crossfade_s exclude each other: set one of them")
        if self.query_caption != "random" and self.query_caption not in self.caption_columns:
            raise ValueError(f"query_caption {self.query_caption!r} is not one of caption_columns "
                             f"{self.caption_columns} (or 'random')")
        if self.min_duration_s and self.max_duration_s and self.min_duration_s > self.max_duration_s:
            raise ValueError("min_duration_s is over max_duration_s")
        if "/" in self.audio_id_prefix or "\\" in self.audio_id_prefix:
            raise ValueError("audio_id_prefix must not contain path separators")
        return self

    def clip_range(self) -> tuple[int, int]:
        v = self.clips_per_audio
        return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))

    def output_fingerprint_fields(self) -> dict:
        """The settings that decide the output bytes (a resume must match them)."""
        return self.model_dump(exclude={"out_dir", "commit_every", "num_workers", "captions_csv", "audio_dir"})
