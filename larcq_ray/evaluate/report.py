"""Evaluation outputs: metrics.json, report.md and recall_at_k.png in one run directory."""

from __future__ import annotations


from collections.abc import Sequence
from pathlib import Path

import numpy as np

from larcq_ray import artifacts
from larcq_ray.core.errors import LarcqError
from larcq_ray.evaluate.metrics import recall_curve, retrieval_metrics

MAX_CURVE_K = 50
TABLE_COLUMNS = ("mode", "R@1", "R@5", "R@10", "mAP@10", "mean rank", "median rank")


def chance_recall(k: int, n_audios: int) -> float:
    """Expected R@k (percent) of a random ranking over n_audios."""
    return 100.0 * min(k, n_audios) / n_audios


def _md_cell(text: str) -> str:
    # A bare "|" in a mode name would split the table row.
    return text.replace("|", "\\|")


def _table(metrics: dict[str, dict]) -> list[str]:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for mode, m in metrics.items():
        cells = [
            _md_cell(mode), f"{m['R@1']:.2f}", f"{m['R@5']:.2f}", f"{m['R@10']:.2f}",
            f"{m['mAP@10']:.2f}", f"{m['mean_rank']:.2f}", f"{m['median_rank']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _best_mode(metrics: dict[str, dict]) -> str:
    # max() keeps the first of equal keys, so ties go to the earliest mode as given.
    return max(metrics, key=lambda mode: metrics[mode]["R@1"])


def _markdown(metrics: dict[str, dict], n_audios: int, notes: Sequence[str], title: str) -> str:
    n_queries = next(iter(metrics.values()))["n_queries"]
    lines = [f"# {title}", ""]
    if notes:
        lines += [f"> {note}" for note in notes] + [""]
    lines += [
        f"{n_queries} queries over {n_audios} audios. Chance level: "
        f"R@1 = {chance_recall(1, n_audios):.2f}, R@5 = {chance_recall(5, n_audios):.2f}.",
        "",
        *_table(metrics),
        "",
        f"Best mode by R@1: **{_md_cell(_best_mode(metrics))}** ({metrics[_best_mode(metrics)]['R@1']:.2f}).",
    ]
    return "\n".join(lines) + "\n"


def _plot(path: Path, ranks_by_mode: dict[str, np.ndarray], n_audios: int, title: str) -> None:
    import matplotlib

    # Agg: jobs run headless (Ray workers, CI), where an interactive backend would fail.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    max_k = min(n_audios, MAX_CURVE_K)
    ks = np.arange(1, max_k + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for mode, ranks in ranks_by_mode.items():
            ax.plot(ks, recall_curve(ranks, max_k), marker="." if max_k <= 20 else None, label=mode)
        ax.plot(ks, [chance_recall(int(k), n_audios) for k in ks], "k--", linewidth=1, label="chance")
        ax.set_xlabel("k")
        ax.set_ylabel("recall@k (%)")
        ax.set_ylim(0, 100)
        ax.set_xlim(1, max(max_k, 2))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        # Close even on failure: repeated evaluations in one process would leak figures.
        plt.close(fig)


def write_report(
    out_dir: Path,
    ranks_by_mode: dict[str, np.ndarray],
    n_audios: int,
    notes: Sequence[str] = (),
    title: str = "LARCQ retrieval",
) -> dict[str, dict]:
    """Write metrics.json, report.md and recall_at_k.png to out_dir; return metrics per mode."""
    if not ranks_by_mode:
        raise LarcqError("no scoring modes to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Dicts keep insertion order, so the mode order given is the order everywhere below.
    metrics = {mode: retrieval_metrics(ranks, n_audios) for mode, ranks in ranks_by_mode.items()}
    artifacts.METRICS.write(out_dir, metrics)
    (out_dir / artifacts.REPORT).write_text(_markdown(metrics, n_audios, notes, title))
    _plot(out_dir / artifacts.RECALL_PLOT, ranks_by_mode, n_audios, title)
    return metrics
