"""Re-ranking: the /rerank Ray Serve application (protocol, router, serving, backends) and the job that
re-ranks a shortlist through it.

Reads: shortlist.parquet, queries.parquet (search) and captions.parquet (caption).
Writes: reranked.parquet, rerank_meta.json. Serves: POST /rerank, GET /healthz.
"""
