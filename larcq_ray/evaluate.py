"""Evaluate job: gt_ranks.parquet -> metrics.json, report.md, recall_at_k.png."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from larcq_ray.errors import LarcqError
from larcq_ray.report import write_report
from larcq_ray.rerank_eval import final_metrics, final_report_lines


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
    ranks_path, meta_path = run_dir / "gt_ranks.parquet", run_dir / "search_meta.json"
    if not ranks_path.exists() or not meta_path.exists():
        raise LarcqError(f"no search results in {run_dir}: run `larcq-ray search` first")
    meta = json.loads(meta_path.read_text())
    table = pq.read_table(ranks_path).to_pandas()
    ranks_by_mode = {}
    for mode in meta["modes"]:
        sub = table[table["mode"] == mode].sort_values("query_id")
        ranks_by_mode[mode] = np.asarray(sub["gt_rank"], dtype=np.int64)
    metrics = write_report(run_dir, ranks_by_mode, meta["n_audios"], notes=report_notes(meta),
                           title=f"LARCQ retrieval: {meta['n_queries']} queries, model {meta['model']}")
    if (run_dir / "reranked.parquet").exists() and (run_dir / "rerank_meta.json").exists():
        metrics["final"] = _final_section(run_dir, table)
    return metrics


def _final_section(run_dir: Path, gt_table) -> dict:
    """Honest figures of the re-ranked order, appended to metrics.json and report.md."""
    rmeta = json.loads((run_dir / "rerank_meta.json").read_text())
    mode = rmeta["mode"]
    short = pq.read_table(run_dir / "shortlist.parquet").to_pandas()
    short = short[short["mode"] == mode].sort_values(["query_id", "rank"])
    reranked = pq.read_table(run_dir / "reranked.parquet").to_pandas().sort_values(["query_id", "rank"])
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
    metrics_path = run_dir / "metrics.json"
    all_metrics = json.loads(metrics_path.read_text())
    all_metrics["final"] = m
    metrics_path.write_text(json.dumps(all_metrics, indent=2))
    with open(run_dir / "report.md", "a") as f:
        f.write("\n".join(final_report_lines(m, mode)) + "\n")
    return m
