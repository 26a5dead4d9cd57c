"""Where an audio is cut into chunks, in samples.

Three modes, named for what they do:
- `fixed`: windows of L seconds every (L - overlap) seconds; the partial last window is kept.
- `equal`: the LARCQ research code's ceil(duration / L) near-equal parts (np.array_split).
- `none`: the whole file as one chunk (CLAP fusion handles long input).
"""

from __future__ import annotations

import math

import numpy as np

from larcq_ray.core.errors import LarcqError


def chunk_spans(
    n_samples: int,
    sample_rate: int,
    mode: str,
    window_s: float = 10.0,
    overlap_s: float = 0.0,
    min_chunk_s: float = 0.0,
) -> list[tuple[int, int]]:
    """Half-open [start, end) sample spans covering the audio, in order."""
    if n_samples <= 0:
        return []
    if mode == "none":
        return [(0, n_samples)]
    # Round to whole samples once, so exact multiples never produce an empty tail window.
    win = int(round(window_s * sample_rate))
    if win <= 0:
        raise LarcqError(f"chunk window of {window_s} s is shorter than one sample")
    if mode == "equal":
        n_parts = max(1, math.ceil(n_samples / win))
        # array_split puts the remainder in the first parts; reproduce it exactly.
        sizes = [len(p) for p in np.array_split(np.empty(n_samples, dtype=np.uint8), n_parts)]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return [(int(s), int(s + n)) for s, n in zip(starts, sizes)]
    if mode != "fixed":
        raise LarcqError(f"unknown chunking mode {mode!r}; valid: fixed, equal, none")
    hop = win - int(round(overlap_s * sample_rate))
    if hop <= 0:
        raise LarcqError(f"overlap_s ({overlap_s}) must be smaller than window_s ({window_s})")
    min_len = int(round(min_chunk_s * sample_rate))
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + win, n_samples)
        if spans and end - start < min_len:
            break  # drop a short tail; earlier windows already cover most of it
        spans.append((start, end))
        if end >= n_samples:
            break
        start += hop
    return spans
