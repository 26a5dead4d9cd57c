"""Evaluate job: gt_ranks.parquet -> metrics.json, report.md, recall_at_k.png."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from larcq_ray.errors import LarcqError
from larcq_ray.report import write_report


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
    return write_report(run_dir, ranks_by_mode, meta["n_audios"], notes=report_notes(meta),
                        title=f"LARCQ retrieval: {meta['n_queries']} queries, model {meta['model']}")
