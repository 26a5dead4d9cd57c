import pytest

from larcq_ray.core.errors import LarcqError
from larcq_ray.evaluate.rerank_metrics import final_metrics, final_report_lines


def test_hand_built_case_with_a_demotion():
    gt = ["a", "b", "c", "d"]
    clap = [["a", "x", "y"], ["x", "b", "y"], ["c", "x", "y"], ["x", "y", "z"]]
    final = [["a", "x", "y"], ["b", "x", "y"], ["x", "c", "y"], ["y", "x", "z"]]
    m = final_metrics(clap, final, gt)
    # query 0 stays right, 1 is fixed, 2 is demoted, 3 is out of the shortlist either way
    assert m["clap_R@1"] == 50.0 and m["R@1"] == 50.0
    assert m["fixed_top1"] == 1 and m["demoted_top1"] == 1
    assert m["research_final_R@1"] == 75.0  # overstates by the demotion
    assert m["research_R1_boost"] == 50.0  # its evaluate_final_result.py: 1 fix / 2 CLAP correct top-1s
    assert m["R@5"] == 75.0 and m["clap_R@5"] == 75.0
    text = "\n".join(final_report_lines(m, "audio-max+query-sum"))
    assert "| 50.00 |" in text and "1 / 1" in text and "+50.00" in text


def test_mismatched_lengths_raise():
    with pytest.raises(LarcqError):
        final_metrics([["a"]], [], ["a"])
