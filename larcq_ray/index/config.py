"""The `index` section: how audio is cut into chunks and how the index job is sized."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


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
    # Where CLAP's mel features are computed: "cpu-torch" in the decode tasks (batched, shipped as
    # float16 mel to GPU actors, 128 KB a chunk; float32 to CPU ones), "device" in the embedding actor
    # from 48 kHz float32 samples (1.9 MB a chunk, the least CPU per chunk), "cpu-numpy" transformers'
    # extractor (the reference);
    # "auto": device where the actors get a GPU, else cpu-torch. benchmarks/bench_features.py measures them.
    features: Literal["auto", "cpu-torch", "device", "cpu-numpy"] = "auto"
    commit_every_files: int = Field(64, ge=1)  # files per committed manifest part
    # Embedded rows per chunks part the writer tasks put in the store (1024 x 512 float32 = 2 MB).
    # A writer task waits for this many rows, so files are committed about every rows_per_part
    # chunks (or commit_every_files files, whichever comes later): smaller commits more often.
    rows_per_part: int = Field(1024, ge=1)
    # On disk: float32, or float16 (half the bytes; search computes in float32 either way).
    embedding_dtype: Literal["float32", "float16"] = "float32"
    # Where the index lives: None = <run_dir>/index; or any path or URI (s3://, gs://...): every
    # stage reads and writes it there in place, workers included.
    location: Optional[str] = None
    silence_threshold_db: float = -80.0  # peak below this (dBFS) = silent file
