"""Index: a corpus -> decoded, chunked audio -> CLAP embeddings -> a Parquet index.

Reads: audio files (data.corpus or data.benchmark/audios). Writes: <run_dir>/index/ (meta.json,
chunks/ and files/ parts: see store.py). Modules: config (the `index` section), chunking, stages
(the Ray Data stages), store (the index on disk), job (the job).
"""
