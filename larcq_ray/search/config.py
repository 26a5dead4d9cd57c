"""The `search` section: query chunking, scoring modes and how much of each ranking is kept."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
