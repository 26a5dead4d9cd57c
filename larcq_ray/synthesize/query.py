"""The raw LARCQ query of a long audio, built from its clips' captions as the research recipe does."""

from __future__ import annotations


def build_query(captions: list[str] | tuple[str, ...]) -> str:
    """LARCQ query from per-event captions: trailing period removed, ', '-joined, lower-cased."""
    return ", ".join(c.strip().rstrip(".").strip() for c in captions).lower()
