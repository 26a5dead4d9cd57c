"""CLAP mel features in torch, batched: the same numbers as transformers' ClapFeatureExtractor.

`ClapFeatureExtractor` computes one clip at a time with a Python loop over STFT frames (about
1,000 numpy FFT calls per 10-s chunk). Here a batch of chunks is one batched `torch.fft` on CUDA
(the embedding actor), or on CPU (the decode tasks) numpy's pocketfft over cache-sized blocks of
frames. What is reproduced, step by step:

- padding: `repeatpad` (tile the clip, then zero-pad to 10 s);
- long input: `fusion` (mel of the whole clip, three seeded crops + a bilinear shrink of the whole,
  is_longer True) or `rand_trunc` (a seeded waveform crop); the corner case of a clip between 10 s
  and 10 s + one hop gives 4 copies of its own mel, is_longer False, as the extractor does;
- crops: the same draws as `AudioFeaturizer` (numpy's legacy RNG seeded with `fusion_seed`, the
  same calls in the same order), taken from a private `RandomState` so the global RNG is untouched;
- STFT: centre reflect padding, the periodic Hann window, float64 FFT (a float32 FFT's rounding
  error, relative to a frame's loud bins, is larger than its quiet bins: their dB values drift by up
  to 0.6 dB); then power and filterbank in float32 (positive terms: a relative 1e-7), floor 1e-10
  and 10*log10 in float64, float32 out; transformers rounds the spectrum to complex64 on the way
  (also ~1e-7). The filterbanks are the extractor's own arrays (htk for fusion, slaney for
  rand_trunc), so nothing about the filters is re-derived.

Resampling stays on CPU (soxr HQ, ~3 ms a 10-s chunk at 44.1 kHz): a device resampler would not
give soxr's samples, and shipping samples as int16 or float16 already fails the embedding test
(tests/test_clap_features.py), so what the device path receives is float32 at the model's rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

MEL_FLOOR = 1e-10  # transformers' spectrogram mel_floor and power_to_db min_value (-100 dB)


@dataclass(frozen=True)
class ClapFeatureSpec:
    """Everything the features depend on, taken from a ClapFeatureExtractor."""

    sample_rate: int
    max_samples: int
    hop: int
    win: int
    n_mels: int
    fusion: bool  # True: truncation "fusion" (htk filters); False: "rand_trunc" (slaney filters)
    filters: np.ndarray  # (n_fft // 2 + 1, n_mels) float64, the extractor's own array
    padding: str = "repeatpad"

    @classmethod
    def from_extractor(cls, extractor, fusion: bool) -> "ClapFeatureSpec":
        padding = str(getattr(extractor, "padding", "repeatpad"))
        if padding not in ("repeatpad", "repeat", "pad"):
            raise ValueError(f"unknown CLAP padding {padding!r}")
        return cls(
            sample_rate=int(extractor.sampling_rate), max_samples=int(extractor.nb_max_samples),
            hop=int(extractor.hop_length), win=int(extractor.fft_window_size), n_mels=int(extractor.feature_size),
            fusion=bool(fusion),
            filters=np.asarray(extractor.mel_filters if fusion else extractor.mel_filters_slaney, dtype=np.float64),
            padding=padding,
        )

    @property
    def chunk_frames(self) -> int:
        return self.max_samples // self.hop + 1  # frames of a centre-padded 10-s clip (1001)

    @property
    def channels(self) -> int:
        return 4 if self.fusion else 1


def _pad_short(x: np.ndarray, n: int, padding: str) -> np.ndarray:
    """The extractor's padding of a clip shorter than `n` samples (float64 out)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("an empty clip has no CLAP features")
    if len(x) < n:
        if padding == "repeat":
            x = np.tile(x, int(n / len(x)) + 1)[:n]
        elif padding == "repeatpad":
            x = np.tile(x, int(n / len(x)))
        x = np.pad(x, (0, n - len(x)))
    return x


@dataclass
class _Plan:
    """One clip's route: `wave` is a 10-s waveform for the batched STFT, or None for a long fused
    clip (`whole`: its full waveform, `starts`: its three crop frames)."""

    wave: Optional[np.ndarray]
    whole: Optional[np.ndarray] = None
    starts: tuple = ()
    is_longer: bool = False


def plan_clip(x: np.ndarray, spec: ClapFeatureSpec, seed: int) -> _Plan:
    """The seeded, per-clip decisions of ClapFeatureExtractor (padding, crops), on CPU."""
    n, mx = len(x), spec.max_samples
    if n <= mx:
        return _Plan(_pad_short(x, mx, spec.padding))
    rng = np.random.RandomState(seed)  # == np.random.seed(seed) then np.random.* (AudioFeaturizer)
    if not spec.fusion:
        at = int(rng.randint(0, n - mx + 1))
        return _Plan(np.asarray(x[at:at + mx], dtype=np.float64))  # AudioFeaturizer reports is_longer False here
    total = 1 + n // spec.hop  # frames of the centre-padded whole clip
    if total == spec.chunk_frames:  # 10 s < length < 10 s + one hop: the whole clip, 4 copies, not "longer"
        return _Plan(np.asarray(x, dtype=np.float64))
    ranges = np.array_split(list(range(0, total - spec.chunk_frames + 1)), 3)
    ranges = [r if len(r) else [0] for r in ranges]
    starts = tuple(int(rng.choice(r)) for r in ranges)
    return _Plan(None, whole=np.asarray(x), starts=starts, is_longer=True)


class TorchClapFeatures:
    """Batched CLAP features on one torch device; build once per process (filters and window are cached)."""

    def __init__(self, spec: ClapFeatureSpec, device="cpu", max_batch: Optional[int] = None):
        import torch

        self.spec = spec
        self.device = torch.device(device)
        # clips per FFT call on a GPU: bounds the complex128 spectrum's memory (~8 MB a 10-s clip)
        self.max_batch = max_batch or 128
        # np.hanning(win + 1)[:-1]: transformers' periodic Hann window, in float64
        self.window = torch.as_tensor(np.hanning(spec.win + 1)[:-1], dtype=torch.float64, device=self.device)
        nz = np.flatnonzero(np.abs(spec.filters).sum(axis=1) > 0)
        # Only the bins some filter uses (below 14 kHz: ~300 of 513) enter the product.
        self.lo, self.hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 1)
        self.filters32 = torch.as_tensor(spec.filters[self.lo:self.hi], dtype=torch.float32, device=self.device)
        self.filters_np, self.window_np = self.filters32.cpu().numpy(), self.window.cpu().numpy()
        self.cpu_block = 64  # frames per FFT call on CPU (64 x 1024 float64 = 512 KB: in L2)

    # -- the core: log-mel of equal-length waveforms -------------------------------------------
    def log_mel(self, waves) -> "torch.Tensor":
        """(B, N) waveforms (any float/int dtype; cast to float64) -> (B, frames, mels) float32 log-mel."""
        import torch

        waves = torch.as_tensor(waves)
        if waves.dim() == 1:
            waves = waves[None]
        if self.device.type == "cpu":
            return torch.from_numpy(np.stack([self._log_mel_cpu(w) for w in waves.numpy()]))
        out = []
        for i in range(0, waves.shape[0], self.max_batch):
            # moved as they come (float32: half the bytes of float64), then widened on the device
            out.append(self._log_mel(waves[i:i + self.max_batch].to(self.device).to(torch.float64)))
        return torch.cat(out) if len(out) > 1 else out[0]

    def _reflect_pad(self, x):
        half = self.spec.win // 2  # np.pad(mode="reflect"), by hand (torch's reflect pad is slower)
        if isinstance(x, np.ndarray):
            return np.concatenate([x[1:half + 1][::-1], x, x[-half - 1:-1][::-1]])
        import torch

        return torch.cat([x[:, 1:half + 1].flip(-1), x, x[:, -half - 1:-1].flip(-1)], dim=-1)

    def _log_mel(self, x) -> "torch.Tensor":
        """The device path: (B, N) float64 -> (B, frames, mels) float32, one batched FFT."""
        import torch

        frames = self._reflect_pad(x).unfold(-1, self.spec.win, self.spec.hop) * self.window  # (B, frames, win)
        spec = torch.fft.rfft(frames)[..., self.lo:self.hi]  # complex128; only the bins the filters use
        # float64 matters in the FFT (quiet bins next to loud ones); the power is positive and summed
        # with positive weights, so float32 from here on costs a relative 1e-7 (4e-7 dB)
        power = (spec.real.square() + spec.imag.square()).float()
        mel = torch.matmul(power, self.filters32).double().clamp_min_(MEL_FLOOR)  # (B, frames, mels)
        return (10.0 * torch.log10(mel)).float()  # floor and log in float64: silence is exactly -100 dB

    def _log_mel_cpu(self, x: np.ndarray) -> np.ndarray:
        """The same on CPU, one clip, in blocks of frames that stay in cache (measured 2.4x faster than
        one torch FFT over all 1,001 frames, whose 8 MB buffers page-fault on every call): numpy's
        pocketfft, float64; power in float32 as above."""
        fv = np.lib.stride_tricks.sliding_window_view(self._reflect_pad(np.asarray(x, dtype=np.float64)),
                                                      self.spec.win)[::self.spec.hop]
        n, blk = fv.shape[0], self.cpu_block
        power = np.empty((n, self.hi - self.lo), dtype=np.float32)
        buf = np.empty((min(blk, n), self.spec.win))
        for a in range(0, n, blk):
            b = min(n, a + blk)
            np.multiply(fv[a:b], self.window_np, out=buf[:b - a])
            spec = np.fft.rfft(buf[:b - a], axis=-1)[:, self.lo:self.hi]
            np.add(np.square(spec.real), np.square(spec.imag), out=power[a:b], casting="same_kind")
        mel = np.maximum((power @ self.filters_np).astype(np.float64), MEL_FLOOR)
        return (10.0 * np.log10(mel)).astype(np.float32)

    # -- clips ----------------------------------------------------------------------------------
    def __call__(self, clips: Sequence[np.ndarray], seed: int = 0):
        """Clips (1-D float arrays at the model's rate, any lengths) -> (features (B, C, 1001, mels)
        float32 tensor on the device, is_longer (B,) bool numpy), as AudioFeaturizer gives them."""
        import torch

        parts, longer = self.compact(clips, seed)
        ch = self.spec.channels
        if all(len(p) == 1 for p in parts) and parts:
            return torch.cat(parts)[:, None].expand(-1, ch, -1, -1).contiguous(), longer
        return torch.stack([p.expand(ch, -1, -1) for p in parts]), longer

    def compact(self, clips: Sequence[np.ndarray], seed: int = 0):
        """As __call__, but each clip's features as (4, frames, mels) when fused, else (1, frames, mels):
        the one mel a fusion input repeats 4x is not copied (what the decode tasks ship)."""
        import torch

        mx = self.spec.max_samples
        clips = [np.asarray(c) for c in clips]
        # A clip of exactly 10 s needs no plan: it goes into the batch as it is (float32 on the way
        # to the device, float64 there), so an actor on a GPU does no per-sample work on its CPU.
        plans = [None if len(c) == mx else plan_clip(c, self.spec, seed) for c in clips]
        parts: list = [None] * len(clips)
        waves = {i: (c if p is None else p.wave) for i, (c, p) in enumerate(zip(clips, plans))
                 if p is None or (p.wave is not None and len(p.wave) == mx)}
        if waves and self.device.type == "cpu":  # clip by clip anyway: no stacked copy
            for i, w in waves.items():
                parts[i] = torch.from_numpy(self._log_mel_cpu(w))[None]
        elif waves:
            mel = self.log_mel(torch.as_tensor(np.stack(list(waves.values()))))
            for j, i in enumerate(waves):
                parts[i] = mel[j:j + 1]
        for i, p in enumerate(plans):
            if parts[i] is not None:
                continue
            if p.wave is not None:  # 10 s < length < 10 s + one hop: the clip's own 1001 frames
                parts[i] = self.log_mel(torch.tensor(p.wave))
            else:  # a copy (torch.tensor): shipped rows are read-only buffers
                parts[i] = self.fuse(self.log_mel(torch.tensor(p.whole))[0], p.starts)
        return parts, np.array([p is not None and p.is_longer for p in plans], dtype=bool)

    def fuse(self, mel, starts) -> "torch.Tensor":
        """A long clip's (frames, mels) log-mel -> the 4-channel fusion input (shrink + 3 crops)."""
        import torch

        c = self.spec.chunk_frames
        shrink = torch.nn.functional.interpolate(mel[None, None], size=[c, self.spec.n_mels], mode="bilinear",
                                                 align_corners=False)[0, 0]
        return torch.stack([shrink] + [mel[s:s + c] for s in starts])


def clap_features_torch(samples, fusion: bool, seed: int = 0, lengths=None, extractor=None, device=None):
    """Public entry point: (B, T) float32 samples at 48 kHz (a tensor; rows may be zero-padded past
    `lengths`) -> (input_features (B, 4 or 1, 1001, 64) float32 tensor, is_longer (B,) bool tensor),
    on the samples' device (or `device`). `extractor`: the model's ClapFeatureExtractor (its filters
    and sizes); None builds transformers' default one (48 kHz, 64 mels, 0-14 kHz)."""
    import torch

    if extractor is None:
        from transformers import ClapFeatureExtractor

        extractor = ClapFeatureExtractor()
    samples = torch.as_tensor(samples)
    dev = device if device is not None else samples.device
    fz = _torch_features(ClapFeatureSpec.from_extractor(extractor, fusion), str(dev))
    if samples.dim() == 1:
        samples = samples[None]
    if lengths is None:
        lengths = [samples.shape[1]] * samples.shape[0]
    lengths = [int(n) for n in torch.as_tensor(lengths).tolist()]
    mx = fz.spec.max_samples
    if all(n == mx for n in lengths) and samples.shape[1] == mx:  # the common case stays on the device
        mel = fz.log_mel(samples)
        feats = mel[:, None].expand(-1, fz.spec.channels, -1, -1).contiguous()
        return feats, torch.zeros(samples.shape[0], dtype=torch.bool, device=feats.device)
    clips = [samples[i, :n].double().cpu().numpy() for i, n in enumerate(lengths)]
    feats, longer = fz(clips, seed)
    return feats, torch.as_tensor(longer, device=feats.device)


_CACHE: dict = {}


def _torch_features(spec: ClapFeatureSpec, device: str) -> TorchClapFeatures:
    key = (spec.sample_rate, spec.max_samples, spec.hop, spec.win, spec.n_mels, spec.fusion, spec.padding,
           spec.filters.tobytes().__hash__(), device)
    if key not in _CACHE:
        _CACHE[key] = TorchClapFeatures(spec, device)
    return _CACHE[key]
