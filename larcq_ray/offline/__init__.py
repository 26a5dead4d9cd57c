"""The offline kit: what lets larcq_ray run, test and demo with no model hub and no data set.

A synthetic sound world (labelled events, held-out phrasings), tiny models built from real
transformers classes with random weights (CLAP, Qwen2-Audio, a causal LM), the demo CLAP trained
on the sound world (committed weights + MiniLM), a small synthetic benchmark, and `larcq-ray demo`.
Product code never imports this package; the CLI's `demo` command is the one door into it.
"""
