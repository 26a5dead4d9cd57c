"""Wire format of the /search service.

Request:  {"query": str, "top_k"?: int, "mode"?: str, "rerank"?: bool}
Response: {"query", "mode", "chunks": [str], "n_audios", "results": [{"rank", "audio_id", "score",
           "audio_url", "windows": [{"chunk", "text", "start_s", "end_s", "similarity"}]}]}
Errors:   the /rerank service's {"error": {"message", "type", "field"}} (larcq_ray.rerank.protocol).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from larcq_ray.search.config import MODES


class SearchRequest(BaseModel):
    # strict: "5" is not a valid top_k; clients get told
    model_config = ConfigDict(extra="forbid", strict=True)

    query: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    top_k: Optional[int] = Field(default=None, ge=1)  # None: search.serve.default_top_k; max: max_top_k
    mode: Optional[str] = None  # a scoring mode (search/config.MODES); None: the service's default
    # re-order the top_k through the re-rank service, comparing the query with stored captions
    rerank: bool = False

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in MODES:
            raise ValueError(f"unknown scoring mode {v!r}; valid: {', '.join(MODES)}")
        return v


class Window(BaseModel):
    chunk: int  # index of the query chunk in `chunks`; -1 = the whole query (audio-max / audio-sum)
    text: str  # that query chunk's text
    start_s: float  # the audio's best-matching window for it
    end_s: float
    similarity: float  # cosine similarity of the chunk and the window


class SearchResult(BaseModel):
    rank: int  # 1-based
    audio_id: str
    score: float  # the mode's vote score, higher = better
    windows: list[Window]  # empty for modes that score whole files (none, query-max, query-sum)
    # with rerank: score is the fused score (rerank settings of the config); these say how it came
    clap_rank: Optional[int] = None
    clap_score: Optional[float] = None
    rerank_score: Optional[float] = None  # None: the audio has no caption and kept its CLAP score
    note: str = ""  # why (no caption, captioning failed)
    # GET it to hear the recording (Range supported); with an API key it carries a short-lived token
    audio_url: Optional[str] = None


class SearchResponse(BaseModel):
    query: str  # as searched (whitespace normalized)
    mode: str
    chunks: list[str]  # the query chunks scored (the whole query when it could not be cut)
    truncated: bool  # the query was longer than the text tower's limit (it was cut, not refused)
    n_audios: int  # audios in the index
    results: list[SearchResult]  # best first
    reranked: bool = False
    uncaptioned: list[str] = []  # with rerank: results that had no caption (they kept their CLAP score)


class SearchHealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    n_audios: int
    modes: list[str]  # the modes this index supports
    default_mode: str  # the mode of a request that names none
    auth_required: bool  # /search needs Authorization: Bearer <key>
    n_captioned: int  # audios with stored captions (rerank: true re-orders only those)
