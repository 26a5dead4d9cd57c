"""Cut a whole file into caption windows and join their captions into one timeline caption.

Research ALM captioners saw only the first 10-33 s of 75-150 s files; here every part of the file
is captioned, one window at a time.
"""

from __future__ import annotations

MIN_TAIL_S = 1.0  # a last partial window shorter than this is dropped (unless it is the only one)


def caption_windows(n_samples: int, sample_rate: int, window_s: float) -> list[tuple[int, int]]:
    """Back-to-back (start, end) sample spans covering the file; the last may be shorter."""
    if n_samples <= 0:
        return []
    if window_s <= 0 or sample_rate <= 0:
        raise ValueError(f"window_s and sample_rate must be positive, got {window_s}, {sample_rate}")
    win = max(1, int(round(window_s * sample_rate)))
    spans = [(s, min(s + win, n_samples)) for s in range(0, n_samples, win)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < MIN_TAIL_S * sample_rate:
        spans.pop()
    return spans


def _fmt(t: float) -> str:
    return f"{t:.1f}".rstrip("0").rstrip(".")


def timeline_caption(window_captions: list[str], spans_s: list[tuple[float, float]]) -> str:
    """'0-30 s: a dog barks; 30-60 s: rain falls' (in time order; empty captions left out)."""
    if len(window_captions) != len(spans_s):
        raise ValueError(f"{len(window_captions)} captions for {len(spans_s)} spans")
    parts = sorted(zip(spans_s, window_captions), key=lambda p: p[0][0])
    return "; ".join(f"{_fmt(s)}-{_fmt(e)} s: {c.strip()}" for (s, e), c in parts if c.strip())
