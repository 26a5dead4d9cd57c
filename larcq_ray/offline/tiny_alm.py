"""A tiny random-weight Qwen2-Audio (processor, tokenizer, model), built fully offline.

For tests and offline demos of the caption job: it runs the real transformers path (chat
template, audio-token expansion, Whisper features, audio tower, `generate`), but its captions
are gibberish. Its feature extractor is set to a short `chunk_length` so it is fast on CPU;
that is also the backend's default window for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from larcq_ray.offline.tiny_tokenizer import train_byte_level_bpe

AUDIO_TOKEN = "<|AUDIO|>"
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", AUDIO_TOKEN, "<|audio_eos|>"]


def build_tiny_qwen2_audio(out_dir: str | Path, texts: Iterable[str], seed: int = 0,
                           chunk_length_s: int = 4, vocab_size: int = 400) -> Path:
    """Train a small byte-level BPE on `texts`, save it with a random Qwen2-Audio to `out_dir`."""
    import torch
    from transformers import (Qwen2Tokenizer, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration,
                              Qwen2AudioProcessor, WhisperFeatureExtractor)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_byte_level_bpe(texts, vocab_size, _SPECIALS)
    model_json = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    # Qwen2's own tokenizer class, so the folder loads exactly as a real Qwen2-Audio one does.
    hf_tok = Qwen2Tokenizer(vocab=model_json["vocab"], merges=merges, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>", padding_side="left")
    hf_tok.add_special_tokens({"additional_special_tokens": _SPECIALS[1:]})
    tok.model.save(str(out))  # vocab.json + merges.txt, as Qwen checkpoints ship them

    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                 chunk_length=chunk_length_s, n_fft=400)
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=hf_tok)  # the ChatML default template
    processor.save_pretrained(out)

    # The audio tower takes exactly chunk_length s of mel frames (100/s), halved by its stride-2 conv.
    frames = chunk_length_s * 100
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=frames // 2),
        text_config=dict(model_type="qwen2", vocab_size=tok.get_vocab_size(), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id),
        audio_token_index=hf_tok.convert_tokens_to_ids(AUDIO_TOKEN),
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(out)
    return out
