"""Captioning: audio-language models describe every window of each audio.

Reads: audio files (the corpus), shortlist.parquet (which audios, unless an id list is given).
Writes: captions.parquet (one row per window, plus each file's timeline caption).
Modules: config (the `caption` section), backends (the captioner interface and its three kinds),
hf_audio_lm (ALMs native in transformers: Audio Flamingo 3, Qwen2-Audio), prefix_lm (audio encoder
-> connector -> causal LM, the SLAM-AAC / SALMONN / GAMA shape) with audio_encoders, connectors and
prefix_decoder, drcap (DRCap: CLAP embedding projected onto a caption support, retrieval-augmented
prompt), clap_refine (CLAP-Refine: the beam-size candidate closest to the audio), windows (cutting
and joining), stages (Ray Data stages), job (the job).
"""
