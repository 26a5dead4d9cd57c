"""CLAP-Refine (SLAM-AAC): among a window's candidate captions, keep the one CLAP finds closest.

SLAM-AAC decodes each audio once per beam size (2..8), keeps each size's best hypothesis, and
picks among those candidates the one whose CLAP text embedding has the highest cosine with the
audio's CLAP embedding. Here:

    ClapRefiner(cfg.clap_refine, device, sample_rate=<rate of the windows>).pick(waves, candidates)

`waves`: the windows (mono float32 at `sample_rate`, resampled with soxr to the CLAP's rate when
it differs); `candidates`: per window, its candidate captions (any number, duplicates allowed).
Empty candidates never win unless every candidate of a window is empty. Ties go to the first
candidate (the smallest beam size, as the backends order them). The prefix-lm and drcap caption
backends both call it this way.
"""

from __future__ import annotations

import numpy as np

from larcq_ray.caption.config import ClapRefineConfig
from larcq_ray.core.errors import LarcqError


def best_by_cosine(audio: np.ndarray, text: np.ndarray, candidates: list[list[int]]) -> list[int]:
    """For each window i, the position in `candidates[i]` (rows of `text`) with the highest cosine
    to `audio[i]` (-1 where a window has no candidate). Embeddings need not be normalized."""
    a = audio / np.maximum(np.linalg.norm(audio, axis=1, keepdims=True), 1e-12)
    t = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12) if len(text) else text
    out = []
    for i, rows in enumerate(candidates):
        if not rows:
            out.append(-1)
            continue
        out.append(int(np.argmax(t[np.asarray(rows)] @ a[i])))  # argmax: the first of equal scores
    return out


class ClapRefiner:
    """CLAP's audio and text towers (one copy of the model), its featurizer, and the pick."""

    def __init__(self, cfg: ClapRefineConfig, device: str = "auto", *, sample_rate: int, dtype: str = "float32",
                 local_files_only: bool = False):
        from larcq_ray.models.clap import AudioFeaturizer, ClapAudioEncoder, ClapTextEncoder

        self.cfg = cfg
        self.sample_rate = int(sample_rate)  # the rate of the windows given to pick()
        self.featurizer = AudioFeaturizer(cfg.model, 0, local_files_only)
        self.text = ClapTextEncoder(cfg.model, device, dtype, local_files_only, adapter=cfg.adapter)
        # The audio tower of that same loaded model: ClapAudioEncoder only wraps get_audio_features,
        # so it shares the text encoder's copy instead of loading (and holding) a second one.
        audio = ClapAudioEncoder.__new__(ClapAudioEncoder)
        audio.model = self.text.model
        audio.device = next(self.text.model.parameters()).device
        audio.dtype = next(self.text.model.parameters()).dtype
        self.audio = audio

    @property
    def clap_rate(self) -> int:
        return self.featurizer.sample_rate

    def embed_audio(self, waves: list[np.ndarray]) -> np.ndarray:
        """(N, D) L2-normalized CLAP audio embeddings of windows at `self.sample_rate`."""
        import soxr

        feats = []
        for w in waves:
            w = np.asarray(w, dtype=np.float32)
            if self.sample_rate != self.clap_rate:
                w = soxr.resample(w, self.sample_rate, self.clap_rate, quality="HQ").astype(np.float32)
            feats.append(self.featurizer(w))
        return self.audio(np.stack([f.input_features for f in feats]), np.array([f.is_longer for f in feats]))

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """(N, D) L2-normalized CLAP text embeddings."""
        return self.text(list(texts)).embeddings

    def pick(self, waves: list[np.ndarray], candidates: list[list[str]]) -> list[str]:
        """Per window, the candidate caption closest to the window's audio in CLAP's space."""
        if len(waves) != len(candidates):
            raise LarcqError(f"CLAP-Refine: {len(waves)} windows but {len(candidates)} candidate lists")
        if not waves:
            return []
        texts: dict[str, int] = {}  # each distinct non-empty caption is embedded once
        rows: list[list[int]] = []
        kept: list[list[str]] = []
        for cands in candidates:
            keep = [c.strip() for c in cands if c and c.strip()]
            kept.append(keep)
            rows.append([texts.setdefault(c, len(texts)) for c in keep])
        if not texts:
            return ["" for _ in waves]
        best = best_by_cosine(self.embed_audio(waves), self.embed_text(list(texts)), rows)
        return [k[j] if j >= 0 else "" for k, j in zip(kept, best)]
