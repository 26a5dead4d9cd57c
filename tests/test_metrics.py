"""Retrieval metrics against hand-computed values, and the three report files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from larcq_ray.core.errors import LarcqError
from larcq_ray.evaluate.metrics import KS, recall_curve, retrieval_metrics
from larcq_ray.evaluate.report import write_report

METRIC_KEYS = {"R@1", "R@5", "R@10", "mAP@10", "mean_rank", "median_rank", "n_queries", "n_missing_gt"}


def test_hand_computed_with_missing_gt():
    m = retrieval_metrics(np.array([1, 2, 6, 11, 0]), n_audios=20)
    assert m["R@1"] == 20.0
    assert m["R@5"] == 40.0
    assert m["R@10"] == 60.0
    assert m["mAP@10"] == round((1 + 0.5 + 1 / 6) / 5 * 100, 2) == 33.33
    assert m["mean_rank"] == 8.2  # the missing one counts as rank 21
    assert m["median_rank"] == 6.0
    assert m["n_queries"] == 5
    assert m["n_missing_gt"] == 1
    assert set(m) == METRIC_KEYS


def test_types_are_plain_python():
    m = retrieval_metrics(np.array([3, 4], dtype=np.int32), n_audios=5)
    for key in ("R@1", "R@5", "R@10", "mAP@10", "mean_rank", "median_rank"):
        assert type(m[key]) is float
    assert type(m["n_queries"]) is int and type(m["n_missing_gt"]) is int
    json.dumps(m)
    assert m["median_rank"] == 3.5


def test_all_correct():
    m = retrieval_metrics(np.ones(7, dtype=np.int64), n_audios=7)
    assert m["R@1"] == m["R@5"] == m["R@10"] == m["mAP@10"] == 100.0
    assert m["mean_rank"] == 1.0 and m["median_rank"] == 1.0
    assert m["n_missing_gt"] == 0


def test_all_missing():
    m = retrieval_metrics(np.zeros(3, dtype=np.int64), n_audios=4)
    assert m["R@1"] == m["R@10"] == m["mAP@10"] == 0.0
    assert m["mean_rank"] == 5.0 and m["n_missing_gt"] == 3


def test_whole_number_floats_accepted():
    assert retrieval_metrics(np.array([1.0, 2.0]), n_audios=2)["R@1"] == 50.0


@pytest.mark.parametrize(
    "ranks,n_audios",
    [
        (np.array([], dtype=np.int64), 10),  # empty
        (np.array([1, 11]), 10),  # rank past the index
        (np.array([-1, 1]), 10),  # negative rank
        (np.array([1.5]), 10),  # fractional rank
        (np.array([[1, 2]]), 10),  # not 1-D
        (np.array([1]), 0),  # empty index
    ],
)
def test_bad_input_raises(ranks, n_audios):
    with pytest.raises(LarcqError):
        retrieval_metrics(ranks, n_audios)


def test_recall_curve_monotone_and_matches_recall_at_k():
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 31, size=200)
    curve = recall_curve(ranks, 30)
    assert curve.shape == (30,)
    assert np.all(np.diff(curve) >= 0)
    m = retrieval_metrics(ranks, n_audios=30)
    for k in KS:
        assert round(float(curve[k - 1]), 2) == m[f"R@{k}"]
    # Missing ground truths keep the curve below 100 even at k = n_audios.
    assert curve[-1] == pytest.approx(100.0 * np.mean(ranks > 0))


def test_recall_curve_bad_input():
    with pytest.raises(LarcqError):
        recall_curve(np.array([], dtype=np.int64), 5)
    with pytest.raises(LarcqError):
        recall_curve(np.array([1]), 0)


def test_write_report(tmp_path):
    ranks = {
        "mean_sim": np.array([1, 2, 6, 11, 0]),
        "max_sim": np.array([3, 1, 1, 20, 0]),
        "chunk|vote": np.array([2, 2, 2, 2, 2]),
    }
    notes = ["The model is untrained: figures are at chance level.", "1 query's audio failed to index."]
    metrics = write_report(tmp_path, ranks, n_audios=20, notes=notes, title="Test run")

    assert list(metrics) == list(ranks)  # mode order kept
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics
    assert list(on_disk) == list(ranks)
    for m in on_disk.values():
        assert set(m) == METRIC_KEYS

    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Test run")
    for note in notes:
        assert f"> {note}" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(ranks)  # header plus one per mode
    assert "5 queries over 20 audios" in md
    assert "R@1 = 5.00" in md and "R@5 = 25.00" in md
    assert "Best mode by R@1: **max_sim**" in md
    assert "chunk\\|vote" in md  # escaped so the row keeps seven columns

    png = (tmp_path / "recall_at_k.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert len(png) > 5_000


def test_write_report_tie_goes_to_first_mode(tmp_path):
    ranks = {"b": np.array([1, 3]), "a": np.array([1, 2])}
    write_report(tmp_path, ranks, n_audios=3)
    assert "Best mode by R@1: **b**" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "recall_at_k.png").stat().st_size > 1_000


def test_write_report_no_modes(tmp_path):
    with pytest.raises(LarcqError):
        write_report(tmp_path, {}, n_audios=3)
