"""Captioning: audio-language models describe every window of each audio.

Reads: audio files (the corpus), shortlist.parquet (which audios, unless an id list is given).
Writes: captions.parquet (one row per window, plus each file's timeline caption).
Modules: config (the `caption` section), backends (the captioner interface), hf_audio_lm (ALMs
native in transformers), windows (cutting and joining), stages (Ray Data stages), job (the job).
"""
