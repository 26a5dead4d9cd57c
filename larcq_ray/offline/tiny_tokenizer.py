"""Byte-level BPE trained offline, for the tiny models tests and the demo build (no hub here)."""

from __future__ import annotations

import string
from collections.abc import Iterable


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]):
    """A `tokenizers.Tokenizer` over the full byte alphabet, so every character (digits and letters
    used as labels included) is at least one token and nothing maps to <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([*texts, string.digits, string.ascii_letters], trainer=trainer)
    return tok
