"""Search: queries -> chunked -> CLAP text embeddings -> vote scoring against every indexed audio.

Reads: <run_dir>/index/, queries.csv (or data.queries). Writes: queries.parquet, queries_meta.json,
shortlist.parquet, results.parquet, results.md, search_meta.json, and with ground truth gt_ranks.parquet
and retrieved_<mode>.csv. Modules: config (the `search` section and the scoring modes), query_chunking,
scoring (vectorized votes), shards / sharded (the index scored shard by shard on Ray workers), ann
(search.method: ann: FAISS candidates re-scored exactly; `larcq-ray build-ann`), results (matched
windows, results.md), stages (text embedding), job.
"""
