"""Labelled synthetic sound events: pure numpy DSP, one generator per event kind.

Each kind has a key, a few plain-English captions in the style of sound-event datasets
(AudioCaps, Clotho), and a renderer `render(rng, duration_s, sample_rate)` returning mono
float32. Kinds differ audibly in their mel spectrum (pitch region, tonal vs noisy, spectral
slope, rhythm), so a real audio-text model has something to tell apart. Parameters vary a
little per call, drawn from `rng`, so two renders of one kind are alike but not identical.

Oscillators read precomputed wavetables instead of calling np.sin per sample: rendering
10 s at 48 kHz stays at a few milliseconds per event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from larcq_ray.errors import LarcqError

Renderer = Callable[[np.random.Generator, float, int], np.ndarray]

PEAK_MAX = 0.9  # hard ceiling on |sample|; rendered peaks land in GAIN_RANGE below it
GAIN_RANGE = (0.4, 0.85)  # per-render loudness variation (peak amplitude)
FADE_S = 0.01  # fade-in/out: long enough to avoid clicks, short enough to keep onsets sharp
MIN_EVENT_S = 0.02  # shorter is not a sound event, and a few samples of a sine can be all zeros

# 2**16 entries: nearest-index lookup error stays near -90 dB, below 16-bit quantization.
_TABLE_BITS = 16
_TABLE_SIZE = 1 << _TABLE_BITS
_TABLE_MASK = _TABLE_SIZE - 1
_PHASE_FRAC_BITS = 32  # oscillator phase is fixed-point: 1 cycle == 2**32
_PHASE_ONE = 1 << _PHASE_FRAC_BITS


@dataclass(frozen=True)
class EventKind:
    key: str
    captions: tuple[str, ...]
    render: Renderer


# --------------------------------------------------------------------------- building blocks


@lru_cache(maxsize=None)
def _wavetable(harmonics: tuple[float, ...]) -> np.ndarray:
    """One cycle of sum_k a_k sin(k x), peak-normalized; cached per harmonic recipe."""
    phase = np.arange(_TABLE_SIZE) * (2.0 * math.pi / _TABLE_SIZE)
    wave = np.zeros(_TABLE_SIZE)
    for k, amp in enumerate(harmonics, start=1):
        if amp:
            wave += amp * np.sin(k * phase)
    wave /= np.max(np.abs(wave))
    return wave.astype(np.float32)


def _osc(phase: np.ndarray, harmonics: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """Wavetable oscillator over a fixed-point phase (see _steady_phase).

    Consumes `phase` (turned into table indices in place): no multi-MB temporaries.
    """
    phase >>= _PHASE_FRAC_BITS - _TABLE_BITS
    phase &= _TABLE_MASK  # wraps whole cycles, negative phases included
    return _wavetable(harmonics)[phase]


def _phase_step(freq_hz: float | np.ndarray, sr: int) -> np.ndarray:
    return np.round(np.asarray(freq_hz, dtype=np.float64) * (_PHASE_ONE / sr)).astype(np.int64)


def _steady_phase(freq_hz: float, n: int, sr: int, offset_cycles: float = 0.0) -> np.ndarray:
    """Running phase of a fixed-frequency oscillator, in 1/2**32 cycles.

    Integer phase keeps precision over long renders and is ~10x faster than float phase.
    """
    phase = np.arange(n, dtype=np.int64)
    phase *= _phase_step(freq_hz, sr)
    phase += int(offset_cycles * _PHASE_ONE)
    return phase


def _varying_phase(freq_hz: np.ndarray, sr: int) -> np.ndarray:
    """Running phase of an oscillator whose frequency changes per sample (sweeps, vibrato, sirens)."""
    return np.cumsum(_phase_step(freq_hz, sr))


def _time(n: int, sr: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32) / np.float32(sr)


def _shaped_noise(
    rng: np.random.Generator,
    n: int,
    sr: int,
    gain: Callable[[np.ndarray], np.ndarray],
    band_hz: tuple[float, float] = (0.0, math.inf),
) -> np.ndarray:
    """Gaussian noise with amplitude spectrum `gain(freqs_hz)` inside `band_hz`, zero outside.

    White noise's spectrum is itself complex Gaussian, so we draw it there directly:
    one inverse FFT instead of a forward and an inverse one.
    """
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    lo, hi = np.searchsorted(freqs, band_hz)
    lo = max(int(lo), 1)  # no DC
    hi = max(int(hi), lo + 1)  # at least one bin, so the noise is never silent
    spec = np.zeros(len(freqs), dtype=np.complex64)
    draws = rng.standard_normal((2, hi - lo), dtype=np.float32)
    spec[lo:hi] = (draws[0] + 1j * draws[1]) * gain(freqs[lo:hi].astype(np.float32))
    return np.fft.irfft(spec, n).astype(np.float32)


def _add_at(out: np.ndarray, start: int, grain: np.ndarray) -> None:
    """Overlap-add one grain (click, pluck, strike) into `out`, cut at its end."""
    if start >= len(out):
        return
    end = min(len(out), start + len(grain))
    out[start:end] += grain[: end - start]


def _onsets(rng: np.random.Generator, n: int, sr: int, interval_s: tuple[float, float], first_s: float) -> list[int]:
    """Sample positions of randomly spaced events; the first comes early so short renders are not silent."""
    pos, out = first_s, []
    while True:
        start = int(pos * sr)
        if start >= n:
            return out or [0]
        out.append(start)
        pos += float(rng.uniform(*interval_s))


def fade_edges(x: np.ndarray, sr: int, fade_s: float = FADE_S) -> None:
    """In place: sin^2 fade-in and fade-out of fade_s (at most half the sound each)."""
    n = len(x)
    fade = min(int(fade_s * sr), n // 2)
    if fade > 0:
        # sin^2 ramp sampled at mid-points: never exactly 0, so tiny renders keep their sound
        ramp = np.sin((np.arange(fade, dtype=np.float32) + 0.5) * np.float32(0.5 * math.pi / fade)) ** 2
        x[:fade] *= ramp
        x[n - fade :] *= ramp[::-1]


def _finish(x: np.ndarray, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Fade in/out, then scale to a random peak in GAIN_RANGE (<= PEAK_MAX)."""
    x = np.asarray(x, dtype=np.float32).copy()
    n = len(x)
    fade_edges(x, sr)
    peak = float(np.max(np.abs(x))) if n else 0.0
    if not math.isfinite(peak) or peak <= 1e-12:
        raise LarcqError(f"synthetic event rendered silent or invalid audio ({n} samples at {sr} Hz)")
    x *= np.float32(float(rng.uniform(*GAIN_RANGE)) / peak)
    return np.clip(x, -PEAK_MAX, PEAK_MAX)


def _num_samples(duration_s: float, sample_rate: int) -> int:
    if not (isinstance(sample_rate, (int, np.integer)) and sample_rate >= 1000):
        raise LarcqError(f"sample_rate must be an integer >= 1000 Hz, got {sample_rate!r}")
    try:
        seconds = float(duration_s)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= MIN_EVENT_S - 1e-9):  # tolerance: seconds from sample counts
        raise LarcqError(f"event duration must be at least {MIN_EVENT_S} s, got {duration_s!r}")
    return int(round(seconds * sample_rate))


# --------------------------------------------------------------------------- tonal events


def _low_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(110.0, 180.0)
    return _osc(_steady_phase(f, n, sr), (1.0, 0.35, 0.12))


def _high_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(2800.0, 3200.0)
    return _osc(_steady_phase(f, n, sr))


def _major_chord(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    root = rng.uniform(220.0, 330.0)
    organ = (1.0, 0.5, 0.3, 0.15)
    out = np.zeros(n, dtype=np.float32)
    for ratio in (1.0, 1.25, 1.5, 2.0):  # root, major third, fifth, octave
        detune = 1.0 + rng.uniform(-0.002, 0.002)  # a touch of chorus, like real voices
        out += _osc(_steady_phase(root * ratio * detune, n, sr, rng.uniform()), organ)
    return out


def _exp_sweep(f_start: float, f_end: float, n: int, sr: int) -> np.ndarray:
    """Frequency per sample, gliding exponentially (equal time per octave)."""
    frac = np.arange(n) / max(n - 1, 1)
    return f_start * (f_end / f_start) ** frac


def _rising_sweep(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    # Low and buzzy, unlike the falling sweep: an average spectrum cannot hear direction.
    freq = _exp_sweep(rng.uniform(180.0, 260.0), rng.uniform(1800.0, 2400.0), n, sr)
    return _osc(_varying_phase(freq, sr), (1.0, 0.5, 0.33, 0.25))


def _falling_sweep(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    freq = _exp_sweep(rng.uniform(5000.0, 6500.0), rng.uniform(1500.0, 2200.0), n, sr)
    return _osc(_varying_phase(freq, sr))


def _beeping(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(1000.0, 1250.0)
    rate = rng.uniform(1.2, 2.5)  # beeps per second
    beep_s = rng.uniform(0.12, 0.2)
    t_in_beep = (np.arange(n) * (rate / sr) % 1.0) / rate  # seconds since the last beep began
    ramp = 0.003
    gate = np.clip(np.minimum(t_in_beep, beep_s - t_in_beep) / ramp, 0.0, 1.0)
    gate[0] = max(gate[0], 0.5)  # the first beep starts at t=0, so very short renders still sound
    return _osc(_steady_phase(f, n, sr), (1.0, 0.1)) * gate.astype(np.float32)


def _tremolo_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(400.0, 600.0)
    rate = rng.uniform(6.0, 10.0)
    depth = rng.uniform(0.8, 0.95)
    lfo = 1.0 - depth * (0.5 - 0.5 * _osc(_steady_phase(rate, n, sr, 0.25)))  # starts at full level
    return _osc(_steady_phase(f, n, sr), (1.0, 0.3)) * lfo


def _vibrato_tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(650.0, 850.0)
    rate = rng.uniform(4.5, 6.5)
    depth = rng.uniform(0.02, 0.04)  # fraction of f: a singer-like wobble
    freq = f * (1.0 + depth * _osc(_steady_phase(rate, n, sr)).astype(np.float64))
    return _osc(_varying_phase(freq, sr), (1.0, 0.4, 0.15))


def _siren(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    lo = rng.uniform(550.0, 700.0)
    hi = lo * rng.uniform(1.3, 1.4)
    half_period = rng.uniform(0.5, 0.8)  # seconds on each pitch
    square = np.clip(8.0 * _osc(_steady_phase(0.5 / half_period, n, sr)).astype(np.float64), -1.0, 1.0)
    freq = lo + (hi - lo) * (0.5 + 0.5 * square)  # a quick glide between the two pitches
    return _osc(_varying_phase(freq, sr), (1.0, 0.5, 0.33, 0.25, 0.2))


def _buzz(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(90.0, 130.0)
    odd = tuple(1.0 / k if k % 2 else 0.0 for k in range(1, 40))  # band-limited square wave
    return _osc(_steady_phase(f, n, sr), odd)


# --------------------------------------------------------------------------- noise events


def _white_noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    swell = 1.0 + 0.2 * _osc(_steady_phase(rng.uniform(0.2, 0.5), n, sr, rng.uniform()))
    return rng.standard_normal(n, dtype=np.float32) * swell


def _pink_noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return _shaped_noise(rng, n, sr, lambda f: 1.0 / np.sqrt(np.maximum(f, 30.0)), (20.0, math.inf))


def _brown_rumble(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    corner = rng.uniform(150.0, 300.0)  # an extra low-pass: rumble, not hiss

    def gain(f: np.ndarray) -> np.ndarray:
        f = np.maximum(f, 25.0)
        return (1.0 / f) / (1.0 + (f / corner) ** 2)

    return _shaped_noise(rng, n, sr, gain, (20.0, 8 * corner))  # beyond: > 50 dB down


def _whistle(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    center = rng.uniform(1600.0, 2400.0)
    width = center * rng.uniform(0.03, 0.06)  # narrow band: noise that sounds pitched
    band = (center - 4 * width, center + 4 * width)  # the Gaussian is ~0 beyond 4 widths
    noise = _shaped_noise(rng, n, sr, lambda f: np.exp(-0.5 * ((f - center) / width) ** 2), band)
    gusts = 0.65 + 0.35 * _osc(_steady_phase(rng.uniform(0.15, 0.4), n, sr, rng.uniform()))
    return noise * gusts


# --------------------------------------------------------------------------- rhythmic / struck events


def _click_train(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    rate = rng.uniform(15.0, 30.0)
    ring_hz = rng.uniform(3500.0, 5500.0)
    tau = 0.0015
    k = np.arange(int(6 * tau * sr) + 1) / sr
    click = (np.exp(-k / tau) * np.sin(2 * math.pi * ring_hz * k + 0.5)).astype(np.float32)
    out = np.zeros(n, dtype=np.float32)
    period = 1.0 / rate
    for start in _onsets(rng, n, sr, (0.9 * period, 1.1 * period), 0.002):
        _add_at(out, start, click * np.float32(rng.uniform(0.7, 1.0)))
    return out


def _plucks(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    base = rng.uniform(196.0, 262.0)
    scale = (1.0, 9 / 8, 5 / 4, 3 / 2, 5 / 3, 2.0, 9 / 4)  # major pentatonic and a bit: a melody
    tau = rng.uniform(0.12, 0.25)
    ring = int(5 * tau * sr)
    t = _time(ring, sr)
    env = np.exp(-t / np.float32(tau))
    env[-min(len(env), int(0.01 * sr)) :] *= np.linspace(1.0, 0.0, min(len(env), int(0.01 * sr)), dtype=np.float32)
    out = np.zeros(n, dtype=np.float32)
    for start in _onsets(rng, n, sr, (0.25, 0.5), 0.012):
        f = base * scale[int(rng.integers(len(scale)))]
        grain_n = min(ring, n - start)
        tone = _osc(_steady_phase(f, grain_n, sr), (1.0, 0.6, 0.4, 0.25, 0.15, 0.1))
        _add_at(out, start, tone * env[:grain_n])
    return out


def _bell(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f0 = rng.uniform(450.0, 550.0)
    # inharmonic partials of a struck bell: (ratio, amplitude, decay seconds)
    partials = ((1.0, 1.0, 2.0), (2.0, 0.6, 1.2), (2.76, 0.5, 0.8), (5.4, 0.3, 0.4), (8.93, 0.2, 0.25))
    out = np.zeros(n, dtype=np.float32)
    for start in _onsets(rng, n, sr, (1.5, 3.0), 0.012):
        grain_n = min(n - start, int(3.0 * sr))
        t = _time(grain_n, sr)
        grain = np.zeros(grain_n, dtype=np.float32)
        for ratio, amp, decay in partials:
            grain += np.float32(amp) * _osc(_steady_phase(f0 * ratio, grain_n, sr)) * np.exp(-t / np.float32(decay))
        _add_at(out, start, grain)
    return out


def _water_drips(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    for start in _onsets(rng, n, sr, (0.15, 0.6), 0.012):
        f_start = rng.uniform(1100.0, 1500.0)
        f_end = f_start * rng.uniform(2.0, 3.0)  # the rising 'plink' of a drop
        dur = rng.uniform(0.03, 0.05)
        m = max(2, int(dur * sr))
        freq = _exp_sweep(f_start, f_end, m, sr)
        env = np.exp(-np.arange(m) / (0.25 * m))
        _add_at(out, start, (_osc(_varying_phase(freq, sr)) * env).astype(np.float32))
    return out


# --------------------------------------------------------------------------- registry


def _kind(key: str, captions: tuple[str, ...], body: Callable[[np.random.Generator, int, int], np.ndarray]) -> EventKind:
    """Wrap a sample-count generator into the public `render(rng, duration_s, sample_rate)`."""

    def render(rng: np.random.Generator, duration_s: float, sample_rate: int) -> np.ndarray:
        n = _num_samples(duration_s, sample_rate)
        return _finish(body(rng, n, sample_rate), rng, sample_rate)

    render.__name__ = f"render_{key}"
    return EventKind(key, captions, render)


EVENT_KINDS: tuple[EventKind, ...] = (
    _kind("low_tone", (
        "A low tone hums steadily.",
        "A deep electronic hum drones on.",
        "A low-pitched steady tone sounds.",
    ), _low_tone),
    _kind("high_tone", (
        "A high-pitched tone rings continuously.",
        "A shrill electronic tone holds steady.",
        "A piercing high tone sounds.",
    ), _high_tone),
    _kind("major_chord", (
        "A sustained major chord plays.",
        "Several notes sound together in a bright chord.",
        "An organ holds a harmonious chord.",
    ), _major_chord),
    _kind("rising_sweep", (
        "A tone sweeps upward in pitch.",
        "A rising electronic sweep.",
        "A buzzy tone glides steadily higher.",
    ), _rising_sweep),
    _kind("falling_sweep", (
        "A tone sweeps downward in pitch.",
        "A falling electronic tone.",
        "A high tone glides steadily lower.",
    ), _falling_sweep),
    _kind("white_noise", (
        "Static hisses loudly.",
        "A burst of white noise hisses.",
        "Harsh static noise fills the air.",
    ), _white_noise),
    _kind("pink_noise", (
        "Water rushes steadily like a waterfall.",
        "A soft even rushing noise.",
        "A steady whooshing sound like a distant stream.",
    ), _pink_noise),
    _kind("brown_rumble", (
        "A deep rumble like distant thunder.",
        "A low rumbling noise.",
        "Heavy machinery rumbles in the distance.",
    ), _brown_rumble),
    _kind("click_train", (
        "Rapid clicking like a ratchet.",
        "A fast train of clicks.",
        "Something clicks quickly and repeatedly.",
    ), _click_train),
    _kind("beeping", (
        "A device beeps repeatedly.",
        "Short electronic beeps repeat at a steady pace.",
        "An alarm beeps on and off.",
    ), _beeping),
    _kind("tremolo_tone", (
        "A warbling tone pulses rapidly in volume.",
        "A fluttering tone throbs quickly.",
        "A tone trembles with a fast pulsing rhythm.",
    ), _tremolo_tone),
    _kind("vibrato_tone", (
        "A wavering tone like a singing voice.",
        "A tone wobbles gently in pitch.",
        "A tone with a gentle vibrato.",
    ), _vibrato_tone),
    _kind("plucks", (
        "A string is plucked repeatedly.",
        "Plucked guitar-like notes play a melody.",
        "Short plucked notes ring and fade.",
    ), _plucks),
    _kind("siren", (
        "A two-tone siren wails.",
        "An emergency siren alternates between two pitches.",
        "A siren sounds high and low in turn.",
    ), _siren),
    _kind("whistle", (
        "Wind whistles through a narrow gap.",
        "A breathy whistling noise.",
        "A high whistling wind blows.",
    ), _whistle),
    _kind("buzz", (
        "An electric buzzer buzzes.",
        "A harsh buzzing sound.",
        "A loud electrical buzz drones.",
    ), _buzz),
    _kind("bell", (
        "A bell rings and slowly fades.",
        "A metal bell is struck several times.",
        "Chimes ring with a shimmering tone.",
    ), _bell),
    _kind("water_drips", (
        "Water drips steadily.",
        "Drops of water fall into a pool.",
        "Droplets plink one after another.",
    ), _water_drips),
)

_BY_KEY: dict[str, EventKind] = {k.key: k for k in EVENT_KINDS}


def event_kind(kind_key: str) -> EventKind:
    try:
        return _BY_KEY[kind_key]
    except KeyError:
        raise LarcqError(f"unknown event kind {kind_key!r}; known kinds: {', '.join(_BY_KEY)}") from None


def render_event(kind_key: str, rng: np.random.Generator, duration_s: float, sample_rate: int) -> np.ndarray:
    """Render one event of `kind_key`: mono float32, peak in GAIN_RANGE (<= 0.9), faded in and out."""
    return event_kind(kind_key).render(rng, duration_s, sample_rate)
