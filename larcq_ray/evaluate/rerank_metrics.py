"""Figures for a re-ranked shortlist: the honest ones, and the research code's for comparison.

Honest: R@k of the final ranking (is the ground truth among the final top k?).
Research code: its "final R@1" counts CLAP's correct top-1s plus the re-ranker's fixes among
CLAP's misses, so a correct top-1 that the re-ranker demotes still counts as correct; its
"R1 boost" (its evaluate_final_result.py) is the number of fixed misses divided by CLAP's number of
correct top-1s, a relative gain that ignores demotions too. We report both, and how many correct
top-1s the re-ranker demoted, so the difference is visible.
"""

from __future__ import annotations

from collections.abc import Sequence

from larcq_ray.core.errors import LarcqError


def _pct(n: int, total: int) -> float:
    return round(100.0 * n / total, 2)


def final_metrics(clap_rankings: Sequence[Sequence[str]], final_rankings: Sequence[Sequence[str]],
                  ground_truth: Sequence[str]) -> dict:
    """Rankings are per query, best first (the CLAP shortlist and the re-ranked one)."""
    q = len(ground_truth)
    if q == 0 or len(clap_rankings) != q or len(final_rankings) != q:
        raise LarcqError(f"final metrics need one CLAP and one final ranking per query "
                         f"(got {len(clap_rankings)}, {len(final_rankings)} for {q} queries)")
    clap_top1 = [bool(r) and r[0] == g for r, g in zip(clap_rankings, ground_truth)]
    final_top1 = [bool(r) and r[0] == g for r, g in zip(final_rankings, ground_truth)]
    fixes = sum(1 for c, f in zip(clap_top1, final_top1) if f and not c)
    demoted = sum(1 for c, f in zip(clap_top1, final_top1) if c and not f)
    research_final = sum(clap_top1) + fixes  # demotions are not subtracted: the research code's figure
    return {
        "R@1": _pct(sum(final_top1), q),
        "R@5": _pct(sum(g in list(r)[:5] for r, g in zip(final_rankings, ground_truth)), q),
        "clap_R@1": _pct(sum(clap_top1), q),
        "clap_R@5": _pct(sum(g in list(r)[:5] for r, g in zip(clap_rankings, ground_truth)), q),
        "research_final_R@1": _pct(research_final, q),
        # fixes relative to CLAP's correct top-1s, as the research script computes it (0 when CLAP had none)
        "research_R1_boost": _pct(fixes, sum(clap_top1)) if sum(clap_top1) else 0.0,
        "fixed_top1": fixes,
        "demoted_top1": demoted,
        "n_queries": q,
    }


def final_report_lines(m: dict, mode: str) -> list[str]:
    return [
        "",
        f"## After re-ranking (shortlist of `{mode}`)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| final R@1 (honest: final top-1 is the ground truth) | {m['R@1']:.2f} |",
        f"| final R@5 | {m['R@5']:.2f} |",
        f"| CLAP R@1 / R@5 before re-ranking | {m['clap_R@1']:.2f} / {m['clap_R@5']:.2f} |",
        f"| research code's \"final R@1\" (ignores demotions) | {m['research_final_R@1']:.2f} |",
        f"| research code's \"R1 boost\" (fixed misses / CLAP's correct top-1s, %) | {m['research_R1_boost']:+.2f} |",
        f"| CLAP misses fixed / correct top-1s demoted | {m['fixed_top1']} / {m['demoted_top1']} |",
    ]
