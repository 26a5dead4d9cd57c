"""Evaluate: R@k, mAP@10 and ranks per scoring mode, and honest figures after re-ranking.

Reads: gt_ranks.parquet, search_meta.json, and when present shortlist.parquet, reranked.parquet,
rerank_meta.json. Writes: metrics.json, report.md, recall_at_k.png. Modules: metrics, report,
rerank_metrics (after re-ranking, with the research code's figures for comparison), job.

Also `larcq-ray eval-alm` (seed 004's evaluation of a captioner / audio-language model): reads a
test list, writes submission.csv, predictions.parquet, eval.json. Modules: alm_config, alm_testlist,
alm_stages (decode, inference, cost on Ray Data), alm_cost (TTFT, TPOT, peak memory), asr_metrics
(WER, CER), alm_submission (write and validate submission.csv), alm_job; caption_metrics is shared.
"""
