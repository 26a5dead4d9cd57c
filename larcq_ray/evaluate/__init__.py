"""Evaluate: R@k, mAP@10 and ranks per scoring mode, and honest figures after re-ranking.

Reads: gt_ranks.parquet, search_meta.json, and when present shortlist.parquet, reranked.parquet,
rerank_meta.json. Writes: metrics.json, report.md, recall_at_k.png. Modules: metrics, report,
rerank_metrics (after re-ranking, with the research code's figures for comparison), job.
"""
