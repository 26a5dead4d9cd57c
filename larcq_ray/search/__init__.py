"""Search: queries -> chunked -> CLAP text embeddings -> vote scoring against every indexed audio.

Reads: <run_dir>/index/, queries.csv. Writes: queries.parquet, queries_meta.json, shortlist.parquet,
gt_ranks.parquet, retrieved_<mode>.csv, search_meta.json. Modules: config (the `search` section and
the scoring modes), query_chunking, scoring (vectorized votes), stages (text embedding), job.
"""
