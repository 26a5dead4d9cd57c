"""A small world of labelled sound events, for training and evaluating a small CLAP offline.

Every event is an `EventSpec`: a kind (one of `KINDS`, each with its own spectral signature:
pitch region, tonal vs noisy, harmonic recipe, spectral slope) and attributes:

- ``loudness``: ``quiet`` (peak -26 dBFS) or ``loud`` (peak -6 dBFS), for every kind;
- ``pitch``: ``low`` or ``high``, for kinds whose pitch is free (beeps, plucks, bells);
  kinds like ``low_tone`` / ``high_tone`` carry their pitch in the kind itself;
- ``speed``: ``slow`` or ``fast``, for rhythmic or modulated kinds (trains, sweeps, tremolo...).

`render(spec, rng, duration_s, sample_rate)` returns mono float32 (peak <= 1, never clipped),
deterministic given the `np.random.Generator`. `captions(spec, split)` returns plain lower-case
English phrasings with the attribute words filled in: a ``train`` set (>= 4 per kind) and a
disjoint ``heldout`` set (>= 2 per kind) kept for evaluation only. `write_clip_dataset` writes a
Clotho-layout dataset (audio/clip_NNNNN.wav, captions.csv, events.csv), byte-identical per seed.

This is the project's one set of synthetic sound generators: the demo CLAP is trained on these
renders, and `demo_benchmark` builds its long audios from them. The DSP building blocks
(wavetable oscillators, shaped noise, onsets, fades) live in `larcq_ray.offline.dsp`.
"""

from __future__ import annotations

import csv
import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping, Optional, Sequence

import numpy as np

from larcq_ray.core.errors import LarcqError
from larcq_ray.offline.dsp import (
    add_at,
    exp_sweep,
    fade_edges,
    num_samples,
    onsets,
    osc,
    shaped_noise,
    steady_phase,
    time_axis,
    varying_phase,
)

Split = Literal["train", "heldout"]
Body = Callable[[np.random.Generator, int, int, Mapping[str, str]], np.ndarray]

LOUDNESS_PEAK_DBFS = {"quiet": -26.0, "loud": -6.0}
LOUDNESS_JITTER_DB = 1.0  # per-render peak variation, +-; keeps the two levels 18+ dB apart
FADE_S = 0.008
N_CAPTIONS = 5  # caption columns per clip (Clotho layout)

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "loudness": ("quiet", "loud"),
    "pitch": ("low", "high"),
    "speed": ("slow", "fast"),
}

# Template fields -> (attribute, {value: words}); a template's i-th use picks words[i % len].
_WORDS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "loud": ("loudness", {"quiet": ("quiet", "soft", "faint"), "loud": ("loud",)}),
    "loudly": ("loudness", {"quiet": ("quietly", "softly", "faintly"), "loud": ("loudly",)}),
    "pitch": ("pitch", {"low": ("low", "low-pitched", "deep"), "high": ("high", "high-pitched", "shrill")}),
    "speed": ("speed", {"slow": ("slow",), "fast": ("fast", "rapid", "quick")}),
    "speedly": ("speed", {"slow": ("slowly",), "fast": ("quickly", "rapidly", "fast")}),
}


@dataclass(frozen=True)
class SoundKind:
    name: str
    body: Body
    attributes: tuple[str, ...]  # besides loudness: a subset of ("pitch", "speed")
    train: tuple[str, ...]
    heldout: tuple[str, ...]


@dataclass(frozen=True)
class EventSpec:
    """One event: a kind and its attribute values (missing attributes take the first value)."""

    kind: str
    attributes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = kind(self.kind)
        names = ("loudness", *k.attributes)
        extra = set(self.attributes) - set(names)
        if extra:
            raise LarcqError(f"event kind {self.kind!r} has no attribute(s) {sorted(extra)}; it has {list(names)}")
        full = {}
        for a in names:
            v = self.attributes.get(a, ATTRIBUTE_VALUES[a][0])
            if v not in ATTRIBUTE_VALUES[a]:
                raise LarcqError(f"attribute {a}={v!r} is not one of {ATTRIBUTE_VALUES[a]}")
            full[a] = v
        object.__setattr__(self, "attributes", full)

    def __hash__(self) -> int:
        return hash((self.kind, tuple(sorted(self.attributes.items()))))


# --------------------------------------------------------------------------- building blocks


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi))


def _pick(attrs: Mapping[str, str], key: str, table: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    return table[attrs[key]]


def _bl(harmonics: tuple[float, ...], f_max: float, sr: int) -> tuple[float, ...]:
    """Drop harmonics at or above 0.45 sr for a fundamental up to f_max: no aliasing at 16 kHz."""
    keep = max(1, int(0.45 * sr / max(f_max, 1.0)))
    return harmonics[:keep]


def _tone(f: float, n: int, sr: int, harmonics: tuple[float, ...] = (1.0,), offset: float = 0.0) -> np.ndarray:
    return osc(steady_phase(f, n, sr, offset), _bl(harmonics, f, sr))


def _sweep_tone(freq: np.ndarray, sr: int, harmonics: tuple[float, ...] = (1.0,)) -> np.ndarray:
    return osc(varying_phase(freq, sr), _bl(harmonics, float(np.max(freq)), sr))


def _gate(n: int, sr: int, rate_hz: float, on_s: float, ramp_s: float = 0.004) -> np.ndarray:
    """Periodic on/off gate: `on_s` seconds on every 1/rate_hz, starting on at t=0."""
    t_in = (np.arange(n) * (rate_hz / sr) % 1.0) / rate_hz
    gate = np.clip(np.minimum(t_in + ramp_s / 2, on_s - t_in) / ramp_s, 0.0, 1.0)
    return gate.astype(np.float32)


def _lfo(rate_hz: float, n: int, sr: int, offset: float = 0.0) -> np.ndarray:
    return osc(steady_phase(rate_hz, n, sr, offset)).astype(np.float32)


def _decay_env(m: int, sr: int, tau_s: float) -> np.ndarray:
    env = np.exp(-time_axis(m, sr) / np.float32(tau_s))
    tail = min(m, int(0.005 * sr))
    if tail:
        env[-tail:] *= np.linspace(1.0, 0.0, tail, dtype=np.float32)
    return env


def _band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float, slope: float = 0.0) -> np.ndarray:
    """Noise in [lo, hi] Hz with amplitude ~ f**slope (0 white, -0.5 pink, -1 brown)."""
    return shaped_noise(rng, n, sr, lambda f: np.maximum(f, 20.0) ** np.float32(slope), (lo, hi))


SPEED = {"slow": 0, "fast": 1}
_ODD = tuple(1.0 / k if k % 2 else 0.0 for k in range(1, 40))  # square wave
_ORGAN = (1.0, 0.5, 0.3, 0.15)
_TRIANGLE = (1.0, 0.0, 1 / 9, 0.0, 1 / 25)


# --------------------------------------------------------------------------- steady tones


def _low_tone(rng, n, sr, a):
    return _tone(_u(rng, (110.0, 180.0)), n, sr, (1.0, 0.35, 0.12))


def _mid_tone(rng, n, sr, a):
    return _tone(_u(rng, (420.0, 560.0)), n, sr, (1.0, 0.08))


def _high_tone(rng, n, sr, a):
    return _tone(_u(rng, (1700.0, 2100.0)), n, sr)


def _very_high_tone(rng, n, sr, a):
    return _tone(_u(rng, (5500.0, 6500.0)), n, sr)


def _octave_pair(rng, n, sr, a):
    f = _u(rng, (800.0, 900.0))
    return _tone(f, n, sr) + 0.8 * _tone(2 * f, n, sr, offset=_u(rng, (0, 1)))


def _chord(rng, n, sr, root, ratios, timbre):
    out = np.zeros(n, dtype=np.float32)
    for r in ratios:
        out += _tone(root * r * (1.0 + _u(rng, (-0.002, 0.002))), n, sr, timbre, _u(rng, (0, 1)))
    return out


def _major_chord(rng, n, sr, a):
    return _chord(rng, n, sr, _u(rng, (260.0, 330.0)), (1.0, 1.25, 1.5, 2.0), _ORGAN)


def _minor_chord(rng, n, sr, a):
    return _chord(rng, n, sr, _u(rng, (520.0, 600.0)), (1.0, 1.2, 1.5), _TRIANGLE)


def _square_buzz(rng, n, sr, a):
    return _tone(_u(rng, (90.0, 130.0)), n, sr, _ODD)


# --------------------------------------------------------------------------- modulated tones


def _tremolo_tone(rng, n, sr, a):
    rate = _u(rng, ((2.0, 3.5), (7.0, 11.0))[SPEED[a["speed"]]])
    lfo = 1.0 - 0.9 * (0.5 - 0.5 * _lfo(rate, n, sr, 0.25))
    return _tone(_u(rng, (2300.0, 2500.0)), n, sr, (1.0, 0.3)) * lfo


def _vibrato_tone(rng, n, sr, a):
    rate = _u(rng, ((2.5, 3.5), (6.0, 8.0))[SPEED[a["speed"]]])
    f = _u(rng, (1150.0, 1250.0))
    freq = f * (1.0 + 0.03 * _lfo(rate, n, sr).astype(np.float64))
    return _sweep_tone(freq, sr, (1.0, 0.2))


def _siren(rng, n, sr, a):
    lo = _u(rng, (550.0, 700.0))
    hi = lo * _u(rng, (1.3, 1.4))
    half = _u(rng, ((0.6, 0.9), (0.18, 0.28))[SPEED[a["speed"]]])
    square = np.clip(8.0 * _lfo(0.5 / half, n, sr).astype(np.float64), -1.0, 1.0)
    return _sweep_tone(lo + (hi - lo) * (0.5 + 0.5 * square), sr, (1.0, 0.5, 0.33, 0.25, 0.2))


def _repeated_sweep(n: int, sr: int, f0: float, f1: float, period_s: float) -> np.ndarray:
    """Frequency per sample: exponential glides f0 -> f1, restarting every period_s."""
    frac = (np.arange(n) / (period_s * sr)) % 1.0
    return f0 * (f1 / f0) ** frac


def _rising_sweep(rng, n, sr, a):
    period = _u(rng, ((1.6, 2.4), (0.25, 0.4))[SPEED[a["speed"]]])
    freq = _repeated_sweep(n, sr, _u(rng, (180.0, 260.0)), _u(rng, (1800.0, 2400.0)), period)
    return _sweep_tone(freq, sr, (1.0, 0.5, 0.33, 0.25))


def _falling_sweep(rng, n, sr, a):
    period = _u(rng, ((1.6, 2.4), (0.25, 0.4))[SPEED[a["speed"]]])
    hi = min(_u(rng, (5000.0, 6500.0)), 0.45 * sr)
    freq = _repeated_sweep(n, sr, hi, _u(rng, (1500.0, 2200.0)), period)
    return _sweep_tone(freq, sr)


def _fm_chirps(rng, n, sr, a):
    interval = ((0.35, 0.55), (0.1, 0.16))[SPEED[a["speed"]]]
    out = np.zeros(n, dtype=np.float32)
    for start in onsets(rng, n, sr, interval, 0.01):
        m = max(2, int(_u(rng, (0.06, 0.09)) * sr))
        f0 = _u(rng, (3000.0, 3600.0))
        glide = exp_sweep(f0, f0 * 1.4, m)
        fm = 1.0 + 0.06 * np.sin(2 * math.pi * _u(rng, (40.0, 60.0)) * np.arange(m) / sr)
        env = np.sin(np.linspace(0.0, math.pi, m)) ** 2
        add_at(out, start, (_sweep_tone(np.minimum(glide * fm, 0.45 * sr), sr) * env).astype(np.float32))
    return out


# --------------------------------------------------------------------------- rhythmic / struck events


def _beeps(rng, n, sr, a, bands, timbre, on_s, rates):
    f = _u(rng, _pick(a, "pitch", bands))
    gate = _gate(n, sr, _u(rng, rates[SPEED[a["speed"]]]), _u(rng, on_s))
    gate[0] = max(gate[0], 0.5)
    return _tone(f, n, sr, timbre) * gate


def _short_beeps(rng, n, sr, a):
    return _beeps(rng, n, sr, a, {"low": (480.0, 560.0), "high": (1400.0, 1500.0)},
                  (1.0, 0.0, 0.33, 0.0, 0.2), (0.05, 0.08), ((1.5, 2.5), (5.0, 7.0)))


def _long_beeps(rng, n, sr, a):
    return _beeps(rng, n, sr, a, {"low": (700.0, 780.0), "high": (3200.0, 3500.0)},
                  (1.0,), (0.35, 0.45), ((0.7, 0.9), (1.3, 1.5)))


def _plucks(rng, n, sr, a):
    base = _u(rng, _pick(a, "pitch", {"low": (98.0, 123.0), "high": (300.0, 340.0)}))
    scale = (1.0, 9 / 8, 5 / 4, 4 / 3, 3 / 2)
    tau = _u(rng, (0.12, 0.22))
    ring = int(5 * tau * sr)
    env = _decay_env(ring, sr, tau)
    out = np.zeros(n, dtype=np.float32)
    for start in onsets(rng, n, sr, (0.25, 0.45), 0.01):
        m = min(ring, n - start)
        f = base * scale[int(rng.integers(len(scale)))]
        add_at(out, start, _tone(f, m, sr, (1.0, 0.6, 0.4, 0.25, 0.15, 0.1)) * env[:m])
    return out


_BELL_PARTIALS = ((1.0, 1.0, 2.0), (2.0, 0.6, 1.2), (2.76, 0.5, 0.8), (5.4, 0.3, 0.4), (8.93, 0.2, 0.25))


def _bell(rng, n, sr, a):
    f0 = _u(rng, _pick(a, "pitch", {"low": (350.0, 400.0), "high": (1000.0, 1100.0)}))
    out = np.zeros(n, dtype=np.float32)
    for start in onsets(rng, n, sr, (1.2, 2.0), 0.01):
        m = min(n - start, int(2.5 * sr))
        grain = np.zeros(m, dtype=np.float32)
        for ratio, amp, decay in _BELL_PARTIALS:
            if f0 * ratio < 0.45 * sr:
                grain += np.float32(amp) * _tone(f0 * ratio, m, sr) * _decay_env(m, sr, decay)
        add_at(out, start, grain)
    return out


def _metal_clank(rng, n, sr, a):
    out = np.zeros(n, dtype=np.float32)
    ratios = (1.0, 1.47, 2.09, 2.56, 3.14, 3.93)
    for start in onsets(rng, n, sr, (0.5, 0.9), 0.01):
        f0 = _u(rng, (2200.0, 2600.0))
        m = min(n - start, int(0.6 * sr))
        grain = np.zeros(m, dtype=np.float32)
        for r in ratios:
            if f0 * r < 0.45 * sr:
                grain += _tone(f0 * r * _u(rng, (0.99, 1.01)), m, sr, offset=_u(rng, (0, 1))) * _decay_env(m, sr, 0.15)
        add_at(out, start, grain)
    return out


def _water_drips(rng, n, sr, a):
    interval = ((0.4, 0.7), (0.1, 0.18))[SPEED[a["speed"]]]
    out = np.zeros(n, dtype=np.float32)
    for start in onsets(rng, n, sr, interval, 0.01):
        f0 = _u(rng, (1100.0, 1400.0))
        m = max(2, int(_u(rng, (0.03, 0.05)) * sr))
        freq = exp_sweep(f0, min(f0 * _u(rng, (2.0, 2.6)), 0.45 * sr), m)
        add_at(out, start, (_sweep_tone(freq, sr) * np.exp(-np.arange(m) / (0.25 * m))).astype(np.float32))
    return out


def _heartbeat(rng, n, sr, a):
    bpm = _u(rng, ((50.0, 65.0), (115.0, 140.0))[SPEED[a["speed"]]])
    period = 60.0 / bpm
    f = _u(rng, (45.0, 65.0))
    m = int(0.12 * sr)
    thump = _tone(f, m, sr, (1.0, 0.3)) * _decay_env(m, sr, 0.035)
    out = np.zeros(n, dtype=np.float32)
    for start in onsets(rng, n, sr, (0.97 * period, 1.03 * period), 0.01):
        add_at(out, start, thump)
        add_at(out, start + int(0.28 * period * sr), 0.7 * thump)  # lub-dub
    return out


def _click_train(rng, n, sr, a):
    """Sharp clicks ringing briefly at 7-8.5 kHz: a bright tick."""
    rate = _u(rng, ((2.0, 4.0), (15.0, 25.0))[SPEED[a["speed"]]])
    ring = min(_u(rng, (7000.0, 8500.0)), 0.4 * sr)
    tau = 0.0008
    k = np.arange(int(6 * tau * sr) + 1) / sr
    click = (np.exp(-k / tau) * np.sin(2 * math.pi * ring * k + 0.5)).astype(np.float32)
    out = np.zeros(n, dtype=np.float32)
    for start in onsets(rng, n, sr, (0.9 / rate, 1.1 / rate), 0.003):
        add_at(out, start, click * np.float32(_u(rng, (0.7, 1.0))))
    return out


def _pulse_train(rng, n, sr, a):
    """Narrow rectangular pulses: a harmonic comb below ~1 kHz (sinc null at 1/width)."""
    rate = _u(rng, ((3.0, 5.0), (30.0, 45.0))[SPEED[a["speed"]]])
    width = max(1, int(_u(rng, (0.0009, 0.0011)) * sr))
    pulse = np.ones(width, dtype=np.float32)
    out = np.zeros(n, dtype=np.float32)
    for start in onsets(rng, n, sr, (0.98 / rate, 1.02 / rate), 0.003):
        add_at(out, start, pulse)
    return out - np.float32(out.mean())


def _knocks(rng, n, sr, a):
    interval = ((0.5, 0.8), (0.12, 0.18))[SPEED[a["speed"]]]
    out = np.zeros(n, dtype=np.float32)
    m = int(0.08 * sr)
    for start in onsets(rng, n, sr, interval, 0.01):
        f = _u(rng, (180.0, 240.0))
        body = _tone(f, m, sr, (1.0, 0.0, 0.5)) * _decay_env(m, sr, 0.02)
        hit = _band_noise(rng, m, sr, 1500.0, 4000.0) * _decay_env(m, sr, 0.006)
        add_at(out, start, body + 3.0 * hit / np.float32(max(1e-9, float(np.max(np.abs(hit))))))
    return out


# --------------------------------------------------------------------------- noises


def _white_noise(rng, n, sr, a):
    return rng.standard_normal(n, dtype=np.float32) * (1.0 + 0.2 * _lfo(_u(rng, (0.2, 0.5)), n, sr))


def _pink_noise(rng, n, sr, a):
    return _band_noise(rng, n, sr, 20.0, math.inf, -0.5)


def _brown_noise(rng, n, sr, a):
    return _band_noise(rng, n, sr, 20.0, math.inf, -1.0)


def _low_rumble(rng, n, sr, a):
    x = _band_noise(rng, n, sr, 30.0, _u(rng, (160.0, 220.0)))
    return x * (0.7 + 0.3 * _lfo(_u(rng, (0.2, 0.5)), n, sr, _u(rng, (0, 1))))


def _hiss(rng, n, sr, a):
    return _band_noise(rng, n, sr, min(_u(rng, (10000.0, 11000.0)), 0.4 * sr), 16000.0)


def _whistling_wind(rng, n, sr, a):
    center = min(_u(rng, (2600.0, 3100.0)), 0.3 * sr)
    width = center * _u(rng, (0.06, 0.09))
    noise = shaped_noise(rng, n, sr, lambda f: np.exp(-0.5 * ((f - center) / width) ** 2),
                          (center - 4 * width, center + 4 * width))
    return noise * (0.65 + 0.35 * _lfo(_u(rng, (0.15, 0.4)), n, sr, _u(rng, (0, 1))))


def _howling_wind(rng, n, sr, a):
    center = _u(rng, (420.0, 520.0))
    width = center * 0.12
    noise = shaped_noise(rng, n, sr, lambda f: np.exp(-0.5 * ((f - center) / width) ** 2),
                          (center - 4 * width, center + 4 * width))
    return noise * (0.5 + 0.5 * _lfo(_u(rng, (0.2, 0.4)), n, sr, _u(rng, (0, 1))) ** 2)


def _gated_noise(rng, n, sr, a):
    rate = _u(rng, ((1.5, 2.5), (7.0, 10.0))[SPEED[a["speed"]]])
    gate = _gate(n, sr, rate, 0.5 / rate, ramp_s=0.006)
    gate[0] = max(gate[0], 0.5)
    return _band_noise(rng, n, sr, 150.0, 700.0) * gate


def _crackle(rng, n, sr, a):
    out = np.zeros(n, dtype=np.float32)
    for start in onsets(rng, n, sr, (0.005, 0.06), 0.003):
        out[start] += np.float32(_u(rng, (0.2, 1.0)) * rng.choice((-1.0, 1.0)))
    spec = np.fft.rfft(out)
    f = np.fft.rfftfreq(n, 1.0 / sr)
    spec *= (f > 600.0) & (f < 3000.0)  # band-limited pops
    return np.fft.irfft(spec, n).astype(np.float32)


# --------------------------------------------------------------------------- catalogue


def _k(name: str, body: Body, attributes: tuple[str, ...], train: tuple[str, ...],
       heldout: tuple[str, ...]) -> SoundKind:
    return SoundKind(name, body, attributes, train, heldout)


P, S, PS = ("pitch",), ("speed",), ("pitch", "speed")

KINDS: tuple[SoundKind, ...] = (
    _k("low_tone", _low_tone, (), (
        "a {loud} low hum drones steadily",
        "a {loud} deep electronic tone holds",
        "a low steady tone hums {loudly}",
        "a {loud} low-pitched drone",
        "a {loud} bass tone sounds continuously",
    ), (
        "a deep humming tone sustains {loudly}",
        "{loud} low droning hum",
    )),
    _k("mid_tone", _mid_tone, (), (
        "a {loud} steady tone in the middle register",
        "a {loud} pure tone sounds at a medium pitch",
        "a medium-pitched tone holds {loudly}",
        "a {loud} plain sine tone plays",
        "a {loud} test tone of moderate pitch",
    ), (
        "a moderate pitched pure tone rings {loudly}",
        "{loud} steady mid-range tone",
    )),
    _k("high_tone", _high_tone, (), (
        "a {loud} high-pitched tone rings continuously",
        "a {loud} high steady tone",
        "a high electronic tone holds {loudly}",
        "a {loud} shrill sine tone sounds",
        "a {loud} high pure tone rings",
    ), (
        "a high tone sings out {loudly} without stopping",
        "{loud} continuous high-pitched ringing",
    )),
    _k("very_high_tone", _very_high_tone, (), (
        "a {loud} piercing very high tone",
        "a {loud} extremely high-pitched whine",
        "a very high tone squeals {loudly}",
        "a {loud} thin piercing whine rings",
        "a {loud} ultra high ringing tone",
    ), (
        "a piercing whine at the top of hearing sounds {loudly}",
        "{loud} very high-pitched squeal",
    )),
    _k("octave_pair", _octave_pair, (), (
        "a {loud} pair of tones an octave apart",
        "two {loud} notes an octave apart sound together",
        "an octave interval rings {loudly}",
        "a {loud} tone doubled an octave higher",
        "two pure tones in octaves hum {loudly}",
    ), (
        "a note and its upper octave sound {loudly} together",
        "{loud} octave pair of pure tones",
    )),
    _k("major_chord", _major_chord, (), (
        "a {loud} sustained major chord plays",
        "an organ holds a {loud} bright chord",
        "a happy major chord rings {loudly}",
        "several notes sound {loudly} together in a major chord",
        "a {loud} cheerful organ chord",
    ), (
        "a bright organ harmony is held {loudly}",
        "{loud} major triad on an organ",
    )),
    _k("minor_chord", _minor_chord, (), (
        "a {loud} sad minor chord is held",
        "a {loud} gloomy minor chord rings",
        "a soft flute-like minor chord sounds {loudly}",
        "three notes form a {loud} minor chord",
        "a {loud} melancholy chord lingers",
    ), (
        "a mournful minor harmony sounds {loudly}",
        "{loud} minor triad of mellow tones",
    )),
    _k("square_buzz", _square_buzz, (), (
        "a {loud} electric buzzer buzzes",
        "a {loud} harsh buzzing sound",
        "a low square wave buzzes {loudly}",
        "a {loud} electrical buzz drones",
        "a {loud} raspy buzzer hums",
    ), (
        "a gritty electrical buzz drones {loudly}",
        "{loud} harsh buzzer tone",
    )),
    _k("tremolo_tone", _tremolo_tone, S, (
        "a {loud} tone pulses {speedly} in volume",
        "a {loud} warbling tone throbs {speedly}",
        "a {loud} tremolo tone with a {speed} pulse",
        "a tone swells and fades {speedly} and {loudly}",
        "a {loud} throbbing tone wavers {speedly}",
    ), (
        "a {loud} note with a {speed} tremolo",
        "a tone pulsates {speedly} and {loudly} in loudness",
    )),
    _k("vibrato_tone", _vibrato_tone, S, (
        "a {loud} tone wobbles {speedly} in pitch",
        "a {loud} wavering tone with {speed} vibrato",
        "a tone with a {speed} vibrato sings {loudly}",
        "a {loud} singing tone wavers {speedly}",
        "a {loud} tone bends up and down {speedly}",
    ), (
        "a {loud} voice-like tone with a {speed} wobble",
        "a pitch wavers {speedly} like a singer, {loudly}",
    )),
    _k("siren", _siren, S, (
        "a {loud} two-tone siren wails {speedly}",
        "a {loud} emergency siren alternates {speedly} between two pitches",
        "a siren switches {speedly} between high and low, {loudly}",
        "a {loud} {speed} siren sounds",
        "a {loud} alarm siren goes up and down {speedly}",
    ), (
        "a {loud} police siren flips {speedly} between two notes",
        "an ambulance siren blares {loudly} with a {speed} alternation",
    )),
    _k("rising_sweep", _rising_sweep, S, (
        "a {loud} tone sweeps upward {speedly}",
        "a {loud} {speed} rising electronic sweep",
        "a buzzy tone glides {speedly} higher, {loudly}",
        "a {loud} tone climbs {speedly} in pitch",
        "a {loud} upward pitch sweep repeats {speedly}",
    ), (
        "a {loud} buzzing glide ascends {speedly}",
        "pitch keeps rising {speedly} in a {loud} sweep",
    )),
    _k("falling_sweep", _falling_sweep, S, (
        "a {loud} tone sweeps downward {speedly}",
        "a {loud} {speed} falling electronic tone",
        "a high tone glides {speedly} lower, {loudly}",
        "a {loud} tone drops {speedly} in pitch",
        "a {loud} downward pitch sweep repeats {speedly}",
    ), (
        "a {loud} whistling glide descends {speedly}",
        "pitch keeps falling {speedly} in a {loud} sweep",
    )),
    _k("fm_chirps", _fm_chirps, S, (
        "{loud} electronic chirps repeat {speedly}",
        "a {loud} bird-like chirp sounds {speedly} again and again",
        "{speed} {loud} chirping",
        "short {loud} chirps tweet {speedly}",
        "a {loud} synthetic bird chirps {speedly}",
    ), (
        "{loud} little tweets come {speedly} one after another",
        "a {loud} {speed} series of high chirps",
    )),
    _k("short_beeps", _short_beeps, PS, (
        "a {loud} {pitch} beep repeats {speedly}",
        "{loud} {pitch} short beeps at a {speed} pace",
        "a device gives {speed} {pitch} beeps, {loudly}",
        "{speed} {loud} {pitch} blips",
        "a {loud} {pitch} short beep sounds {speedly} again and again",
    ), (
        "{pitch} electronic pips repeat {speedly} and {loudly}",
        "a {loud} {pitch} bleep pattern, {speed}",
    )),
    _k("long_beeps", _long_beeps, PS, (
        "a {loud} {pitch} long beep repeats {speedly}",
        "{loud} {pitch} sustained beeps at a {speed} pace",
        "an alarm gives long {pitch} beeps {speedly}, {loudly}",
        "{speed} {loud} {pitch} long tones on and off",
        "a {loud} {pitch} lengthy beep sounds {speedly} over and over",
    ), (
        "{pitch} drawn-out beeps repeat {speedly} and {loudly}",
        "a {loud} {pitch} pattern of long beeps, {speed}",
    )),
    _k("plucks", _plucks, P, (
        "a {loud} {pitch} string is plucked repeatedly",
        "{loud} {pitch} plucked notes ring and fade",
        "{pitch} guitar-like plucks play a melody {loudly}",
        "a {loud} {pitch} plucked melody",
        "a {pitch} string instrument plucks notes {loudly}",
    ), (
        "{pitch} harp-like notes are plucked {loudly}",
        "a {loud} {pitch} picked string melody",
    )),
    _k("bell", _bell, P, (
        "a {loud} {pitch} bell rings and fades",
        "a {pitch} metal bell is struck {loudly}",
        "a {loud} {pitch} chime rings out",
        "a {loud} {pitch} bell tolls",
        "a {pitch} bell is struck {loudly} several times",
    ), (
        "{loud} {pitch} chiming of a struck bell",
        "a {pitch} church-like bell sounds {loudly}",
    )),
    _k("metal_clank", _metal_clank, (), (
        "{loud} metal objects clank together",
        "a {loud} metallic clanging",
        "metal pieces clink {loudly}",
        "a {loud} clinking of metal",
        "a {loud} tinny metallic strike repeats",
    ), (
        "something metallic clatters {loudly}",
        "{loud} jangling metal hits",
    )),
    _k("water_drips", _water_drips, S, (
        "{loud} water drips {speedly}",
        "drops of water fall {speedly} into a pool, {loudly}",
        "{loud} droplets plink {speedly} one after another",
        "{speed} {loud} dripping water",
        "a {loud} tap drips {speedly}",
    ), (
        "{loud} drops splash {speedly} into water",
        "water drips {loudly} at a {speed} rate",
    )),
    _k("heartbeat", _heartbeat, S, (
        "a {loud} heartbeat thumps {speedly}",
        "a {loud} {speed} heartbeat",
        "a heart beats {speedly} with {loud} thumps",
        "{loud} deep thumps like a {speed} pulse",
        "a {loud} lub-dub heartbeat pounds {speedly}",
    ), (
        "a heart pounds {speedly} and {loudly}",
        "{loud} {speed} thudding of a heart",
    )),
    _k("click_train", _click_train, S, (
        "{loud} clicks repeat {speedly}",
        "a {loud} {speed} train of clicks",
        "something clicks {speedly} and {loudly}",
        "{loud} ticking clicks at a {speed} rate",
        "a {loud} clicking sound repeats {speedly}",
    ), (
        "{loud} tick tick tick going {speedly}",
        "a {speed} {loud} ratchet-like clicking",
    )),
    _k("pulse_train", _pulse_train, S, (
        "{loud} electronic pulses repeat {speedly}",
        "a {loud} {speed} pulse train",
        "a {loud} stream of pulses ticks {speedly}",
        "{speed} {loud} electric pulses",
        "a {loud} pulsing signal beats {speedly}",
    ), (
        "a {loud} {speed} series of dull electric pops",
        "square pulses thud {speedly} and {loudly}",
    )),
    _k("knocks", _knocks, S, (
        "someone knocks {speedly} on a wooden door, {loudly}",
        "{loud} {speed} knocking on wood",
        "a {loud} knocking repeats {speedly}",
        "{loud} wooden knocks come {speedly}",
        "a hand raps {speedly} and {loudly} on a table",
    ), (
        "{loud} {speed} tapping on a wooden surface",
        "someone raps {loudly} on wood at a {speed} pace",
    )),
    _k("white_noise", _white_noise, (), (
        "{loud} white noise hisses",
        "a {loud} burst of static",
        "{loud} harsh static fills the air",
        "static noise hisses {loudly}",
        "{loud} broadband white noise",
    ), (
        "a {loud} radio static hiss",
        "untuned noise crackles {loudly} like static",
    )),
    _k("pink_noise", _pink_noise, (), (
        "{loud} pink noise rushes steadily",
        "a {loud} even rushing noise like a waterfall",
        "a steady whooshing noise sounds {loudly}",
        "{loud} rushing noise like a distant stream",
        "a {loud} soft-edged pink noise",
    ), (
        "a waterfall rushes {loudly} in the distance",
        "{loud} steady rush of pink noise",
    )),
    _k("brown_noise", _brown_noise, (), (
        "{loud} brown noise rumbles",
        "a {loud} dark rushing noise",
        "a deep muffled noise roars {loudly}",
        "{loud} brown noise like heavy surf",
        "a {loud} muffled roar of noise",
    ), (
        "a dark roaring noise like ocean waves, {loudly}",
        "{loud} deep brownian noise",
    )),
    _k("low_rumble", _low_rumble, (), (
        "a {loud} low rumble like distant thunder",
        "a {loud} deep rumbling noise",
        "heavy machinery rumbles {loudly} far away",
        "a {loud} subsonic rumble",
        "a {loud} rumble of an engine far off",
    ), (
        "thunder grumbles {loudly} far away",
        "{loud} bassy rumbling",
    )),
    _k("hiss", _hiss, (), (
        "a {loud} high hiss",
        "{loud} air hisses from a valve",
        "a thin hiss sounds {loudly}",
        "a {loud} sharp hiss of escaping steam",
        "{loud} bright hissing noise",
    ), (
        "a tyre leaks air with a {loud} hiss",
        "steam hisses {loudly} from a pipe",
    )),
    _k("whistling_wind", _whistling_wind, (), (
        "{loud} wind whistles through a narrow gap",
        "a {loud} breathy whistling noise",
        "a high whistling wind blows {loudly}",
        "{loud} whistling of wind in a crack",
        "a {loud} airy whistle comes and goes",
    ), (
        "a draught whistles {loudly} under a door",
        "{loud} wind whistling around a window",
    )),
    _k("howling_wind", _howling_wind, (), (
        "{loud} wind howls",
        "a {loud} moaning wind swells and fades",
        "a hollow wind howls {loudly}",
        "a {loud} ghostly howling wind",
        "{loud} wind moans in gusts",
    ), (
        "a storm wind wails {loudly} in waves",
        "{loud} low moaning of wind",
    )),
    _k("gated_noise", _gated_noise, S, (
        "{loud} bursts of noise turn on and off {speedly}",
        "a {loud} {speed} chopped noise",
        "noise is switched on and off {speedly}, {loudly}",
        "{loud} {speed} chuffing bursts",
        "a {loud} noise gate stutters {speedly}",
    ), (
        "a steam train chuffs {speedly} and {loudly}",
        "{loud} shushing noise in {speed} bursts",
    )),
    _k("crackle", _crackle, (), (
        "a {loud} fire crackles",
        "{loud} crackling like frying oil",
        "crackles and pops sound {loudly}",
        "a {loud} crackling vinyl record",
        "{loud} random crackling pops",
    ), (
        "a campfire snaps and pops {loudly}",
        "{loud} sizzling crackle",
    )),
)

_BY_NAME: dict[str, SoundKind] = {k.name: k for k in KINDS}
KIND_NAMES: tuple[str, ...] = tuple(_BY_NAME)


def kind(name: str) -> SoundKind:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise LarcqError(f"unknown sound kind {name!r}; known kinds: {', '.join(_BY_NAME)}") from None


def _template_attributes(template: str) -> set[str]:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    unknown = fields - set(_WORDS)
    if unknown:
        raise LarcqError(f"caption template {template!r} uses unknown field(s) {sorted(unknown)}")
    return {_WORDS[f][0] for f in fields}


def _check_catalogue() -> None:
    if len(_BY_NAME) != len(KINDS):
        raise LarcqError("duplicate sound kind names")
    for k in KINDS:
        want = {"loudness", *k.attributes}
        if len(k.train) < 4 or len(k.heldout) < 2 or set(k.train) & set(k.heldout):
            raise LarcqError(f"kind {k.name}: needs >= 4 train and >= 2 disjoint held-out phrasings")
        for t in k.train + k.heldout:
            if _template_attributes(t) != want or t != t.lower():
                raise LarcqError(f"kind {k.name}: template {t!r} must be lower case and mention exactly {sorted(want)}")


_check_catalogue()


# --------------------------------------------------------------------------- public API


def captions(spec: EventSpec, split: Split = "train", synonyms: Literal["cycle", "all"] = "cycle") -> list[str]:
    """Phrasings of `spec` from `split`, attribute words filled in.

    ``synonyms="cycle"``: one phrasing per template, the i-th template using synonym i;
    ``"all"``: every template with every combination of synonyms (more wording variety for training).
    """
    import itertools

    k = kind(spec.kind)
    if split == "train":
        templates = k.train
    elif split == "heldout":
        templates = k.heldout
    else:
        raise LarcqError(f"caption split must be 'train' or 'heldout', got {split!r}")
    if synonyms not in ("cycle", "all"):
        raise LarcqError(f"synonyms must be 'cycle' or 'all', got {synonyms!r}")
    out = []
    for i, t in enumerate(templates):
        fields = sorted({f for _, f, _, _ in string.Formatter().parse(t) if f})
        options = [_WORDS[f][1][spec.attributes[_WORDS[f][0]]] for f in fields]
        if synonyms == "cycle":
            choices = [tuple(o[i % len(o)] for o in options)]
        else:
            choices = list(itertools.product(*options))
        for words in choices:
            text = " ".join(t.format(**dict(zip(fields, words))).split())
            if text not in out:
                out.append(text)
    return out


def render(spec: EventSpec, rng: np.random.Generator, duration_s: float, sample_rate: int) -> np.ndarray:
    """Mono float32 audio of `spec`: faded in/out, peak at the loudness level (+-1 dB), never clipped."""
    n = num_samples(duration_s, sample_rate)
    x = np.asarray(kind(spec.kind).body(rng, n, int(sample_rate), spec.attributes), dtype=np.float32).copy()
    fade_edges(x, int(sample_rate), FADE_S)
    peak = float(np.max(np.abs(x))) if n else 0.0
    if not math.isfinite(peak) or peak <= 1e-9:
        raise LarcqError(f"{spec.kind} rendered silent or invalid audio ({n} samples at {sample_rate} Hz)")
    db = LOUDNESS_PEAK_DBFS[spec.attributes["loudness"]] + _u(rng, (-LOUDNESS_JITTER_DB, LOUDNESS_JITTER_DB))
    x *= np.float32(10.0 ** (db / 20.0) / peak)
    return x


def all_event_specs() -> list[EventSpec]:
    """Every kind x attribute-value combination (106): the gallery of the quality benchmark."""
    import itertools

    out = []
    for k in KINDS:
        names = ("loudness", *k.attributes)
        for values in itertools.product(*(ATTRIBUTE_VALUES[a] for a in names)):
            out.append(EventSpec(k.name, dict(zip(names, values))))
    return out


def sample_events(n: int, rng: np.random.Generator, kinds: Optional[Sequence[str]] = None) -> list[EventSpec]:
    """`n` specs: kinds uniform over `kinds` (default: all), each attribute value uniform."""
    names = list(KIND_NAMES if kinds is None else kinds)
    if not names:
        raise LarcqError("sample_events needs at least one kind")
    for name in names:
        kind(name)
    out = []
    for _ in range(int(n)):
        k = kind(names[int(rng.integers(len(names)))])
        attrs = {a: ATTRIBUTE_VALUES[a][int(rng.integers(2))] for a in ("loudness", *k.attributes)}
        out.append(EventSpec(k.name, attrs))
    return out


def attribute_sibling(spec: EventSpec, rng: np.random.Generator) -> EventSpec:
    """The same kind with one of its attributes (drawn at random) set to its other value."""
    attr = ("loudness", *kind(spec.kind).attributes)[int(rng.integers(1 + len(kind(spec.kind).attributes)))]
    other = [v for v in ATTRIBUTE_VALUES[attr] if v != spec.attributes[attr]][0]
    return EventSpec(spec.kind, {**spec.attributes, attr: other})


def _pick_captions(options: list[str], rng: np.random.Generator, k: int = N_CAPTIONS) -> list[str]:
    """`k` phrasings: distinct while they last (random order), then repeated in that order."""
    order = [options[i] for i in rng.permutation(len(options))]
    return [order[i % len(order)] for i in range(k)]


def write_clip_dataset(
    out_dir: Path | str,
    n_clips: int,
    seed: int,
    sample_rate: int = 48000,
    duration_s: tuple[float, float] = (2.0, 5.0),
    split: Split = "train",
    synonyms: Literal["cycle", "all"] = "cycle",
    contrast: bool = False,
) -> Path:
    """Write `n_clips` one-event clips under `out_dir` in Clotho layout; same seed -> same bytes.

    audio/clip_00000.wav ... (16-bit PCM), captions.csv (file_name, caption_1..caption_5 from
    `split`, drawn from `captions(spec, split, synonyms)`), events.csv (file_name, kind, attributes
    as JSON, duration_s). `contrast`: every other clip is the previous one's `attribute_sibling`
    (same kind, one attribute flipped): neighbouring files, so training batches see the contrast.
    """
    import soundfile as sf

    if split not in ("train", "heldout"):
        raise LarcqError(f"caption split must be 'train' or 'heldout', got {split!r}")
    lo, hi = (float(d) for d in duration_s)
    if not (0 < lo <= hi):
        raise LarcqError(f"duration_s must be (min, max) with 0 < min <= max, got {duration_s!r}")
    out = Path(out_dir)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if contrast:
        specs = []
        for spec in sample_events((n_clips + 1) // 2, rng):
            specs += [spec, attribute_sibling(spec, rng)]
        specs = specs[:n_clips]
    else:
        specs = sample_events(n_clips, rng)
    cap_rows, event_rows = [], []
    for i, spec in enumerate(specs):
        name = f"clip_{i:05d}.wav"
        dur = round(_u(rng, (lo, hi)), 3)
        audio = render(spec, rng, dur, sample_rate)
        sf.write(audio_dir / name, audio, sample_rate, subtype="PCM_16", format="WAV")
        cap_rows.append([name, *_pick_captions(captions(spec, split, synonyms), rng)])
        event_rows.append([name, spec.kind, json.dumps(spec.attributes, sort_keys=True), f"{dur:.3f}"])
    _write_csv(out / "captions.csv", ["file_name", *(f"caption_{j}" for j in range(1, N_CAPTIONS + 1))], cap_rows)
    _write_csv(out / "events.csv", ["file_name", "kind", "attributes", "duration_s"], event_rows)
    return out


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
