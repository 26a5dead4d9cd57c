"""Evaluate job: gt_ranks.parquet -> metrics.json, report.md, recall_at_k.png."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from larcq_ray import artifacts
from larcq_ray.core.errors import LarcqError
from larcq_ray.evaluate.report import write_report
from larcq_ray.evaluate.rerank_metrics import final_metrics, final_report_lines

log = logging.getLogger(__name__)


def report_notes(meta: dict) -> list[str]:
    notes = []
    card = meta.get("model_card") or {}
    if card and not card.get("trained", True):
        notes.append(
            f"The model ({meta['model']}) has random, untrained weights: these figures are at chance level "
            "and say nothing about the method. They show the pipeline runs end to end."
        )
    if meta.get("n_missing_gt"):
        notes.append(f"{meta['n_missing_gt']} queries' ground-truth audio failed to index: counted as misses.")
    if meta.get("n_truncated_queries"):
        notes.append(f"{meta['n_truncated_queries']} queries exceeded the text tower's limit and were truncated (kept).")
    if meta.get("n_queries_without_chunks"):
        notes.append(
            f"{meta['n_queries_without_chunks']} queries had no {meta['query_chunking']} chunks; "
            "their whole text was used as their one chunk."
        )
    return notes


def run_evaluate(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not artifacts.GT_RANKS.exists(run_dir) or not artifacts.SEARCH_META.exists(run_dir):
        raise LarcqError(f"no search results in {run_dir}: run `larcq-ray search` first")
    meta = artifacts.SEARCH_META.read(run_dir)
    table = artifacts.GT_RANKS.read_pandas(run_dir)
    ranks_by_mode = {}
    for mode in meta["modes"]:
        sub = table[table["mode"] == mode].sort_values("query_id")
        ranks_by_mode[mode] = np.asarray(sub["gt_rank"], dtype=np.int64)
    metrics = write_report(run_dir, ranks_by_mode, meta["n_audios"], notes=report_notes(meta),
                           title=f"LARCQ retrieval: {meta['n_queries']} queries, model {meta['model']}")
    if artifacts.RERANKED.exists(run_dir) and artifacts.RERANK_META.exists(run_dir):
        metrics["final"] = _final_section(run_dir, table)
    return metrics


def _final_section(run_dir: Path, gt_table) -> dict:
    """Honest figures of the re-ranked order, appended to metrics.json and report.md."""
    rmeta = artifacts.RERANK_META.read(run_dir)
    mode = rmeta["mode"]
    short = artifacts.SHORTLIST.read_pandas(run_dir)
    short = short[short["mode"] == mode].sort_values(["query_id", "rank"])
    reranked = artifacts.RERANKED.read_pandas(run_dir).sort_values(["query_id", "rank"])
    gt = gt_table[gt_table["mode"] == mode].sort_values("query_id")
    clap, final, truth = [], [], []
    reranked_by_q = {q: list(g.audio_id) for q, g in reranked.groupby("query_id")}
    for q, g in short.groupby("query_id"):
        order = list(g.audio_id)
        head = reranked_by_q.get(q, order[: rmeta["top_n"]])
        clap.append(order)
        final.append(head + [a for a in order if a not in head])  # below top_n nothing moved
    truth = list(gt.set_index("query_id").loc[sorted(short.query_id.unique()), "gt_audio_id"])
    m = final_metrics(clap, final, truth)
    m.update({"mode": mode, "top_n": rmeta["top_n"], "match": rmeta.get("match"), "fusion": rmeta.get("fusion")})
    all_metrics = artifacts.METRICS.read(run_dir)
    all_metrics["final"] = m
    artifacts.METRICS.write(run_dir, all_metrics)
    with open(run_dir / artifacts.REPORT, "a") as f:
        f.write("\n".join(final_report_lines(m, mode)) + "\n")
    return m


def run(cfg) -> dict:
    """`larcq-ray evaluate`: the metrics table, logged, and the report's path."""
    metrics = run_evaluate(cfg.run_dir)
    log.info("%-22s %7s %7s %7s %8s %9s", "mode", "R@1", "R@5", "R@10", "mAP@10", "mean rank")
    for mode, m in metrics.items():
        if mode == "final":
            log.info("after re-ranking (%s, top %d): R@1 %.2f (CLAP %.2f), R@5 %.2f; %d fixed, %d demoted",
                     m["mode"], m["top_n"], m["R@1"], m["clap_R@1"], m["R@5"], m["fixed_top1"], m["demoted_top1"])
            continue
        log.info("%-22s %7.2f %7.2f %7.2f %8.2f %9.2f", mode, m["R@1"], m["R@5"], m["R@10"], m["mAP@10"], m["mean_rank"])
    log.info("report: %s", Path(cfg.run_dir) / artifacts.REPORT)
    return metrics
