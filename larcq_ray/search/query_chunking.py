"""Cut a long query into sub-captions, one per sound event it names.

- `columns`: the benchmark's split_i cells (the LARCQ ground-truth events); a query without them
  (free text: `--query`, a CSV with only a `query` column) is cut as `joins` cuts it;
- `sentences`: free text cut at sentence ends and at the ", " joins LARCQ queries are built with;
- `joins`: free text cut at sentence ends and at the joins people write between events
  ("and then", "then", "while", "followed by", ";", "," by default: search.query_joins);
- `none`: the whole query as its only chunk.
A query the mode cannot cut (no split cells for `columns`; one piece or none for `sentences` and
`joins`) falls back to the whole query as its one chunk, and is flagged so search can warn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from larcq_ray.core.inputs import Query
from larcq_ray.search.config import DEFAULT_JOINS

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
_JOIN = re.compile(r",\s+")
_STRIP = ".!?;,:- \t\n"
# Left at a piece's start when a punctuation join precedes a word one ("a dog barks, and rain falls").
_LEAD = re.compile(r"^(?:and|then|and then)\b\s*", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    parts = []
    for sentence in _SENTENCE_END.split(text.strip()):
        for piece in _JOIN.split(sentence):
            piece = piece.strip().rstrip(".!?;,").strip()
            if piece:
                parts.append(piece)
    return parts


@lru_cache(maxsize=32)
def _join_pattern(joins: tuple[str, ...]) -> re.Pattern:
    alts = []
    for j in sorted({" ".join(j.split()).lower() for j in joins if j.strip()}, key=len, reverse=True):
        body = r"\s+".join(re.escape(w) for w in j.split())
        # Words match whole words only ("then" not in "authentic"); punctuation matches as written.
        left = r"\b" if j[0].isalnum() else ""
        right = r"\b" if j[-1].isalnum() else ""
        alts.append(left + body + right)
    # Sentence ends: . ! ? followed by whitespace (not "2.5" or "e.g." inside a word).
    alts.append(r"(?<=[.!?])\s+")
    return re.compile("|".join(f"(?:{a})" for a in alts), re.IGNORECASE)


def split_joins(text: str, joins: Sequence[str] = DEFAULT_JOINS) -> list[str]:
    """Free text cut at sentence ends and at `joins`; empty pieces dropped, a leading "and" trimmed."""
    parts = []
    for piece in _join_pattern(tuple(joins)).split(text.strip()):
        piece = piece.strip(_STRIP)
        while True:  # "a dog barks, and then rain falls" with "," and "then" as joins
            trimmed = _LEAD.sub("", piece).strip(_STRIP)
            if trimmed == piece:
                break
            piece = trimmed
        if piece:
            parts.append(piece)
    return parts


def query_chunks(query: Query, mode: str, joins: Sequence[str] = DEFAULT_JOINS) -> tuple[list[str], bool]:
    """(chunks, fell_back): fell_back is True when the mode found nothing to split on and the
    whole query is its only chunk."""
    if mode == "none":
        return [query.text], False
    if mode == "columns":
        if query.splits:
            return list(query.splits), False
        mode = "joins"  # a query without split cells is free text (--query, a CSV of queries)
    if mode == "sentences":
        chunks = split_sentences(query.text)
    elif mode == "joins":
        chunks = split_joins(query.text, joins)
    else:
        raise ValueError(f"unknown query chunking mode {mode!r}")
    if len(chunks) < 2:
        return [query.text], True
    return chunks, False
