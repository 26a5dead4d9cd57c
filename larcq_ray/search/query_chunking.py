"""Cut a long query into sub-captions, one per sound event it names.

- `columns`: the benchmark's split_i cells (the LARCQ ground-truth events);
- `sentences`: free text cut at sentence ends and at the ", " joins LARCQ queries are built with;
- `none`: the whole query as its only chunk.
A query that yields no chunk falls back to itself, so every query has at least one.
"""

from __future__ import annotations

import re

from larcq_ray.core.inputs import Query

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
_JOIN = re.compile(r",\s+")


def split_sentences(text: str) -> list[str]:
    parts = []
    for sentence in _SENTENCE_END.split(text.strip()):
        for piece in _JOIN.split(sentence):
            piece = piece.strip().rstrip(".!?;,").strip()
            if piece:
                parts.append(piece)
    return parts


def query_chunks(query: Query, mode: str) -> tuple[list[str], bool]:
    """(chunks, fell_back): fell_back is True when the mode found nothing to split on."""
    if mode == "none":
        return [query.text], False
    if mode == "columns":
        chunks = list(query.splits)
    elif mode == "sentences":
        chunks = split_sentences(query.text)
    else:
        raise ValueError(f"unknown query chunking mode {mode!r}")
    if not chunks:
        return [query.text], True
    return chunks, False
