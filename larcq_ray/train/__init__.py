"""Train: contrastive CLAP training (full or LoRA) on Ray Train.

Reads: a Clotho-layout clip dataset or a LARCQ provenance.parquet. Writes (train.run_dir):
checkpoints (safetensors + JSON), model_best/, adapter_best/, train_summary.json. Modules: config,
data (pairs and features), loss, loop (the per-worker loop), job.
"""
