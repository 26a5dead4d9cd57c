"""Model loading shared by the stages: CLAP (audio and text towers, adapters), a fresh CLAP built from
sizes, grafting a BERT-family sentence encoder into CLAP's text tower, causal LMs (re-ranker,
refine), MiniLM's location, and the model card. Reads model folders or hub ids; writes model folders
only when asked to build one."""
