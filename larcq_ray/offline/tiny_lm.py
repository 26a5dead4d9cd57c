"""A tiny random-weight Qwen2 causal LM + byte-level BPE tokenizer, built fully offline.

For tests and the offline demo of the listwise backend: it exercises the real transformers code
path (chat template, left padding, next-token logits) but its scores carry no meaning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from larcq_ray.offline.tiny_tokenizer import train_byte_level_bpe

# ChatML, as Qwen uses: the prompt ends at the start of the assistant turn.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_causal_lm(out_dir: str | Path, texts: Iterable[str], seed: int = 0,
                         vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Train a small BPE on `texts`, save it with a random Qwen2 (2 layers of 64 by default) to
    `out_dir`; return it. Larger sizes serve load benchmarks (cost, not quality)."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # The full byte alphabet makes every single character (so every label) one token.
    tok = train_byte_level_bpe(texts, vocab_size, _SPECIALS)

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>")
    hf_tok.chat_template = _CHAT_TEMPLATE
    hf_tok.save_pretrained(out)

    config = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out
