"""Synthesize: build a LARCQ benchmark (long audios of several clips + long multi-event queries) from a
captioned clip dataset, on Ray Data, seeded and resumable.

Reads: a Clotho-layout or CSV clip dataset. Writes (to synthesize.out_dir): queries.csv, audios/,
provenance.parquet, skipped_clips.csv, synthesis_report.json. Modules: config, source (scan the
clips), plan (draw the benchmark), render (join the clips), query (the raw query), job.
"""
