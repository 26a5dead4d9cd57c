import numpy as np
import pytest

from larcq_ray.index.chunking import chunk_spans
from larcq_ray.core.errors import LarcqError

SR = 1000  # 1 kHz keeps the arithmetic readable


def seconds(spans):
    return [(s / SR, e / SR) for s, e in spans]


def test_fixed_shorter_than_window_is_one_partial_chunk():
    assert seconds(chunk_spans(3500, SR, "fixed", 10)) == [(0, 3.5)]


def test_fixed_exact_multiple_has_no_empty_tail():
    assert seconds(chunk_spans(20000, SR, "fixed", 10)) == [(0, 10), (10, 20)]


def test_fixed_keeps_partial_last_window():
    assert seconds(chunk_spans(25000, SR, "fixed", 10)) == [(0, 10), (10, 20), (20, 25)]


def test_fixed_overlap_stops_once_a_window_reaches_the_end():
    assert seconds(chunk_spans(20000, SR, "fixed", 10, overlap_s=5)) == [(0, 10), (5, 15), (10, 20)]
    assert seconds(chunk_spans(22000, SR, "fixed", 10, overlap_s=5)) == [(0, 10), (5, 15), (10, 20), (15, 22)]


def test_fixed_min_chunk_drops_tiny_tail_but_never_the_only_chunk():
    assert seconds(chunk_spans(20300, SR, "fixed", 10, min_chunk_s=1.0)) == [(0, 10), (10, 20)]
    assert seconds(chunk_spans(20300, SR, "fixed", 10, min_chunk_s=0.0)) == [(0, 10), (10, 20), (20, 20.3)]
    assert seconds(chunk_spans(300, SR, "fixed", 10, min_chunk_s=1.0)) == [(0, 0.3)]


def test_fixed_covers_every_sample():
    for n in [1, 999, 10000, 10001, 123457]:
        spans = chunk_spans(n, SR, "fixed", 10, overlap_s=2.5)
        covered = np.zeros(n, bool)
        for s, e in spans:
            assert 0 <= s < e <= n
            covered[s:e] = True
        assert covered.all()


def test_equal_matches_research_array_split():
    # 25 s with L=10: ceil(25/10)=3 near-equal parts of ~8.33 s, exactly as np.array_split
    n = 25000
    spans = chunk_spans(n, SR, "equal", 10)
    ref = np.array_split(np.arange(n), 3)
    assert [(int(p[0]), int(p[-1]) + 1) for p in ref] == spans
    assert len(chunk_spans(20000, SR, "equal", 10)) == 2
    assert chunk_spans(4000, SR, "equal", 10) == [(0, 4000)]
    spans = chunk_spans(10001, SR, "equal", 10)
    assert len(spans) == 2 and spans[0] == (0, 5001) and spans[1] == (5001, 10001)


def test_none_is_whole_file_and_empty_is_nothing():
    assert chunk_spans(123, SR, "none") == [(0, 123)]
    assert chunk_spans(0, SR, "fixed", 10) == []


def test_bad_settings_raise_clear_errors():
    with pytest.raises(LarcqError, match="overlap"):
        chunk_spans(1000, SR, "fixed", 10, overlap_s=10)
    with pytest.raises(LarcqError, match="unknown chunking mode"):
        chunk_spans(1000, SR, "sliding", 10)
