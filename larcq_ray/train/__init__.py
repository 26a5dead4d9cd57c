"""Train: contrastive CLAP training (`train-clap`, full or LoRA) and captioner training
(`train-captioner`: prefix-lm or drcap), both on Ray Train.

Reads: a Clotho-layout clip dataset, a LARCQ provenance.parquet, or (captioners) the SLAM-AAC /
DRCap jsonl formats. Writes (run_dir): checkpoints (safetensors + JSON), model_best/ and
adapter_best/ (CLAP), captioner_best/ (a captioner folder the caption job loads), and a summary
JSON. Modules: config, data, loss, loop, job (CLAP); captioner_config, captioner_data,
captioner_loop, captioner_job (captioners).
"""
