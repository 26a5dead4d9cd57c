"""The `search` section: query chunking, scoring modes and how much of each ranking is kept."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from larcq_ray.search.service_config import SearchServeConfig

# The scoring modes (see search/scoring.py): how query and audio chunks vote.
MODES: tuple[str, ...] = (
    "none",
    "audio-max",
    "audio-sum",
    "query-max",
    "query-sum",
    "audio-max+query-max",
    "audio-max+query-sum",
    "audio-sum+query-max",
    "audio-sum+query-sum",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# Where `joins` cuts free text: the joins people write between events (case-insensitive; words
# match whole words, longest first, so "and then" wins over "then"). Sentence ends always cut.
DEFAULT_JOINS: tuple[str, ...] = ("and then", "then", "while", "followed by", "after that", ";", ",")


class AnnConfig(_Strict):
    """`search.ann`: the approximate (FAISS) index over chunk embeddings for search.method: ann.

    Stored beside the embeddings as <index>/ann/<name>.faiss, <name>.rows.parquet (FAISS row ->
    audio_id) and <name>.json (these settings and the files the index was built from)."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    # a FAISS index_factory string ("IVF1024,PQ64", "IVF256,Flat", "HNSW32", "Flat"); auto:
    # Flat under 50,000 chunks, else IVF<about sqrt(chunks)>,PQ<dim/8> (64 bytes a chunk at 512 dimensions)
    factory: str = "auto"
    nprobe: int = Field(32, ge=1)  # IVF lists visited per query row
    # nearest chunks per query row (the whole query and each query chunk): their audios are the candidates.
    # auto: about chunks / 4096, a power of two, at least 256 (256 at 1M chunks, 2048 at 10M: both gave
    # recall@10 >= 0.95 in benchmarks/bench_scale.py, where each event's audios grow with the corpus)
    candidates: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = "auto"
    # candidate audios re-scored exactly per query: 0 = all of them; N = the N with the best approximate
    # vote (sum over the query's rows of the audio's best fetched-chunk similarity). Fetch deep, re-score few.
    rescore: int = Field(0, ge=0)
    train_sample: int = Field(100_000, ge=1000)  # chunks the quantizers are trained on
    # a missing or stale index (the index gained, lost or changed files since it was built):
    # build it on demand (true), or refuse with a message that says to run `larcq-ray build-ann` (false)
    build_on_demand: bool = True


class SearchConfig(_Strict):
    # columns: the benchmark's split_i cells (a query without them is cut as by joins); sentences:
    # sentence ends and ", "; joins: sentence ends and `query_joins` (free text); none: the whole query.
    query_chunking: Literal["columns", "sentences", "joins", "none"] = "columns"
    query_joins: list[str] = Field(default_factory=lambda: list(DEFAULT_JOINS))
    modes: list[str] = Field(default_factory=lambda: list(MODES))
    top_k: int = Field(100, ge=1)
    query_block: int = Field(256, ge=1)
    chunk_block: int = Field(65536, ge=1)
    text_batch_size: int = Field(64, ge=1)
    # exact: every audio is scored (shard by shard on Ray); ann: a FAISS index proposes candidate
    # audios, which are then scored exactly with all their chunks (search.ann)
    method: Literal["exact", "ann"] = "exact"
    shard_chunks: int = Field(2_000_000, ge=1)  # chunks per shard (a worker holds one shard in memory)
    shard_num_cpus: float = Field(1.0, ge=0)  # per shard task / actor
    shard_num_gpus: Optional[float] = Field(None, ge=0)  # None: a share of the cluster's GPUs, 0 without
    ann: AnnConfig = Field(default_factory=AnnConfig)
    retrieved_csv_k: int = Field(5, ge=1)
    # results.parquet / results.md: the top results_k audios of each query (per mode in the Parquet,
    # for results_mode in the Markdown, default: the first of audio-max+query-sum, audio-max+query-max,
    # audio-max in `modes`, else the first mode), with their matched windows.
    results_k: int = Field(10, ge=1)
    results_mode: Optional[str] = None
    # `larcq-ray serve-search`: the online /search service over run_dir/index
    serve: SearchServeConfig = Field(default_factory=SearchServeConfig)

    @model_validator(mode="after")
    def _known_modes(self) -> "SearchConfig":
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown scoring mode(s) {bad}; valid: {list(MODES)}")
        if not self.modes:
            raise ValueError("at least one scoring mode is needed")
        if self.results_mode is not None and self.results_mode not in self.modes:
            raise ValueError(f"search.results_mode {self.results_mode!r} is not one of search.modes {self.modes}")
        if self.serve.default_mode is not None and self.serve.default_mode not in MODES:
            raise ValueError(f"search.serve.default_mode {self.serve.default_mode!r} is not a scoring mode; "
                             f"valid: {list(MODES)}")
        joins = [j for j in self.query_joins if j.strip()]
        if len(joins) != len(self.query_joins):
            raise ValueError("search.query_joins: empty join")
        return self

    def report_mode(self) -> str:
        if self.results_mode:
            return self.results_mode
        for m in ("audio-max+query-sum", "audio-max+query-max", "audio-max"):
            if m in self.modes:
                return m
        return self.modes[0]
