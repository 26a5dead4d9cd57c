"""Build a small CLAP offline: real transformers classes, small sizes, a BPE trained on given text.

No machine here reaches a model hub, so the demo and the tests build their model with this
and then load it through the same `from_pretrained` path as `laion/clap-htsat-fused`.
The weights are random: retrieval with it is at chance level, and its model card says so.
"""

from __future__ import annotations

from pathlib import Path

from larcq_ray.models.fresh_clap import build_fresh_clap


def build_tiny_clap(
    out_dir: str | Path,
    texts: list[str],
    *,
    fusion: bool = True,
    seed: int = 0,
    vocab_size: int = 1000,
    dim: int = 64,
    max_text_tokens: int = 77,
) -> Path:
    """The tests' and the demo's CLAP: tiny sizes, random weights (its model card says so)."""
    return build_fresh_clap(out_dir, texts, fusion=fusion, seed=seed, vocab_size=vocab_size, dim=dim,
                            max_text_tokens=max_text_tokens, built_by="larcq_ray.offline.tiny_clap.build_tiny_clap",
                            note="random weights: retrieval figures with this model are at chance level")
