"""A fresh CLAP built from sizes: real transformers classes, random weights, a byte-level BPE trained on
the training captions (or a grafted BERT-family text tower). `train-clap` starts from it when its
config gives `init.config` instead of a pretrained model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from larcq_ray.core.errors import LarcqError
from larcq_ray.models.clap import MIN_VOCAB, quiet_transformers
from larcq_ray.models.model_card import MODEL_CARD

_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa ids 0..4: bos, pad, eos, unk, mask


def build_fresh_clap(
    out_dir: str | Path,
    texts: list[str],
    *,
    fusion: bool = False,
    seed: int = 0,
    vocab_size: int = 1000,
    dim: int = 64,
    max_text_tokens: int = 77,
    text_layers: int = 2,
    text_heads: int = 2,
    audio_depths: list[int] = (1, 1, 1, 1),
    audio_heads: list[int] = (1, 1, 2, 2),
    patch_embeds_hidden_size: int = 8,
    audio_patch_size: int = 4,
    audio_window_size: int = 8,
    text_from: str | Path | None = None,
    built_by: str = "larcq_ray.models.fresh_clap.build_fresh_clap",
    note: str = "random weights before training",
) -> Path:
    """A CLAP with random weights and every size a parameter: the start of `train-clap` with init.config.

    `text_from`: a local BERT-family folder (e.g. all-MiniLM-L6-v2) whose weights and tokenizer
    become the text tower (`clap_text_graft`); the text sizes and BPE arguments are then unused.
    """
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    quiet_transformers()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bert = None
    if text_from is not None:
        from larcq_ray.models.clap_text_graft import clap_text_config_from_bert, load_bert

        bert, tokenizer = load_bert(text_from)
        tokenizer.model_max_length = max_text_tokens
        text_config = clap_text_config_from_bert(bert.config, dim)
    else:
        tokenizer = _train_bpe(texts, vocab_size, max_text_tokens)
        text_config = dict(vocab_size=len(tokenizer), hidden_size=dim, num_hidden_layers=text_layers,
                           num_attention_heads=text_heads, intermediate_size=2 * dim,
                           max_position_embeddings=max_text_tokens + 2, projection_dim=dim)
    # truncation must match the audio tower: fusion input for a fused model, plain crops otherwise.
    extractor = ClapFeatureExtractor(truncation="fusion" if fusion else "rand_trunc")
    audio_hidden = patch_embeds_hidden_size * 2 ** (len(audio_depths) - 1)
    config = ClapConfig(
        text_config=text_config,
        audio_config=dict(depths=list(audio_depths), num_attention_heads=list(audio_heads),
                          patch_embeds_hidden_size=patch_embeds_hidden_size, hidden_size=audio_hidden,
                          patch_size=audio_patch_size, patch_stride=[audio_patch_size, audio_patch_size],
                          window_size=audio_window_size, projection_dim=dim, enable_fusion=fusion),
        projection_dim=dim,
    )
    torch.manual_seed(seed)
    model = ClapModel(config).eval()
    if bert is not None:
        from larcq_ray.models.clap_text_graft import graft_bert_into_clap

        graft_bert_into_clap(model, bert)
    model.save_pretrained(out)
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    (out / MODEL_CARD).write_text(json.dumps(
        {"built_by": built_by, "trained": False, "note": note, "fusion": fusion, "seed": seed,
         "text_from": str(text_from) if text_from is not None else None}, indent=2))
    return out


def _train_bpe(texts: list[str], vocab_size: int, max_text_tokens: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    if not texts:
        raise LarcqError("a fresh CLAP needs some text to train its tokenizer on")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=_SPECIALS,
                             show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        tokenizer = RobertaTokenizer.from_pretrained(tmp, model_max_length=max_text_tokens)
    if len(tokenizer) < MIN_VOCAB:
        raise LarcqError(f"the tokenizer trained on the captions has only {len(tokenizer)} entries: give it more text")
    return tokenizer
