"""Tiny random-weight Whisper and AST audio encoders, built fully offline.

For tests and benchmarks of the prefix-lm captioner's encoder kinds (`whisper`, `ast`): real
transformers classes (WhisperModel, ASTModel) saved with their feature extractors, so a folder
loads through the same `from_pretrained` path as openai/whisper-* or MIT/ast-finetuned-audioset.
Their inputs are short (2 s by default) so that they are fast on CPU; their outputs carry no meaning.
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_whisper_encoder(out_dir: str | Path, *, seed: int = 0, chunk_length_s: int = 2, n_mels: int = 32,
                               d_model: int = 32, init_std: float = 0.2) -> Path:
    """A WhisperModel (1 encoder and 1 decoder layer of `d_model`) + its feature extractor, with a
    `chunk_length_s` input: mel frames at 100/s, halved by the encoder's stride-2 conv, so
    max_source_positions = chunk_length_s * 50. `init_std` is larger than Whisper's 0.02 so that the
    random frames differ with the audio (at 0.02 the positional embeddings drown the input)."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fe = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000, hop_length=160,
                                 chunk_length=chunk_length_s, n_fft=400)
    fe.save_pretrained(out)
    mel_frames = fe.nb_max_frames  # chunk_length_s * 100
    config = WhisperConfig(vocab_size=64, num_mel_bins=n_mels, d_model=d_model, encoder_layers=1,
                           encoder_attention_heads=2, encoder_ffn_dim=2 * d_model, decoder_layers=1,
                           decoder_attention_heads=2, decoder_ffn_dim=2 * d_model,
                           max_source_positions=mel_frames // 2, max_target_positions=32,
                           pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
                           suppress_tokens=[], begin_suppress_tokens=[], init_std=init_std)
    torch.manual_seed(seed)
    WhisperModel(config).save_pretrained(out)
    return out


def build_tiny_ast(out_dir: str | Path, *, seed: int = 0, max_length: int = 200, n_mels: int = 32,
                   hidden_size: int = 32) -> Path:
    """An ASTModel (1 layer of `hidden_size`, 16x16 patches at stride 10) + its feature extractor,
    taking `max_length` 10 ms frames (2 s by default)."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ASTFeatureExtractor(num_mel_bins=n_mels, sampling_rate=16000,
                        max_length=max_length).save_pretrained(out)
    config = ASTConfig(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=2 * hidden_size, patch_size=16, frequency_stride=10, time_stride=10,
                       max_length=max_length, num_mel_bins=n_mels)
    torch.manual_seed(seed)
    ASTModel(config).save_pretrained(out)
    return out
