"""`larcq-ray train-clap`: contrastive CLAP training (full or LoRA) on Ray Train."""
