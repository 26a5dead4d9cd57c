"""Synthetic sound events and the demo benchmark written in the LARCQ layout."""

from __future__ import annotations

import csv
import hashlib
import itertools
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from larcq_ray.demo_benchmark import DemoBenchmarkSpec, build_query, write_demo_benchmark
from larcq_ray.errors import LarcqError
from larcq_ray.synth_events import EVENT_KINDS, render_event

KEYS = [k.key for k in EVENT_KINDS]
SPEC = DemoBenchmarkSpec(n_audios=5, events_per_audio=(2, 4), event_seconds=(1.0, 2.0), gap_seconds=0.25, seed=7)

# Measured (seeds 0-2 vs 10-12, 20-22, 30-32): the most alike pair of kind-average spectra is
# pink_noise / brown_rumble at cosine 0.93-0.94, then major_chord / plucks at 0.92-0.935.
MAX_PAIR_COSINE = 0.97
# Measured: 716 of 720 held-out renders (seeds 100-139) land nearest their own kind's average.
MIN_NEAREST_ACCURACY = 0.9


# --------------------------------------------------------------------------- helpers


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def provenance(bench: Path) -> dict[str, list[dict[str, str]]]:
    with open(bench / "provenance.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_audio: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_audio.setdefault(r["audio_id"], []).append(r)
    return by_audio


def band_profile(x: np.ndarray, sr: int, n_bands: int = 32, top_db: float = 80.0) -> np.ndarray:
    """Log-mel-like spectral shape: mean power per mel-spaced band, in dB (80 dB range), centered."""
    n_fft, hop = 1024, 512
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(axis=0)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    inv_mel = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = np.searchsorted(freqs, inv_mel(np.linspace(mel(50.0), mel(sr / 2), n_bands + 1)))
    energy = np.array([power[edges[i] : max(edges[i + 1], edges[i] + 1)].sum() for i in range(n_bands)])
    db = 10.0 * np.log10(energy + 1e-20)
    db = np.maximum(db, db.max() - top_db)
    return db - db.mean()  # spectral shape only: loudness does not matter


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------- event kinds


def test_event_kind_registry():
    assert len(EVENT_KINDS) >= 16
    assert len(set(KEYS)) == len(KEYS)
    all_captions = [c for k in EVENT_KINDS for c in k.captions]
    assert len(set(all_captions)) == len(all_captions)  # a caption names exactly one kind
    for kind in EVENT_KINDS:
        assert len(kind.captions) >= 3, kind.key
        for c in kind.captions:
            # captions are comma-joined into queries, so a comma inside one would blur the splits
            assert "," not in c and c == c.strip() and c[0].isupper() and c.endswith("."), c


@pytest.mark.parametrize("key", KEYS)
def test_every_kind_renders_valid_non_silent_audio(key):
    for sr, seconds in ((48000, 1.5), (32000, 2.0), (44100, 0.02)):
        x = render_event(key, np.random.default_rng(0), seconds, sr)
        assert x.dtype == np.float32 and x.ndim == 1
        assert len(x) == round(seconds * sr)
        assert np.all(np.isfinite(x))
        peak = float(np.max(np.abs(x)))
        assert 0.1 < peak <= 0.9, (key, sr, peak)
        assert float(np.sqrt(np.mean(x**2))) > 1e-3, (key, sr)
        if seconds >= 1.0:
            assert abs(x[0]) < 0.02 * peak and abs(x[-1]) < 0.02 * peak  # faded: no clicks
    same = render_event(key, np.random.default_rng(5), 1.0, 32000)
    assert np.array_equal(same, render_event(key, np.random.default_rng(5), 1.0, 32000))
    assert not np.array_equal(same, render_event(key, np.random.default_rng(6), 1.0, 32000))


def test_rendering_is_fast():
    render_event(KEYS[0], np.random.default_rng(0), 1.0, 48000)  # warm caches (wavetables)
    for key in KEYS:
        best = min(_timed_render(key, seed) for seed in range(2))
        assert best < 0.05, f"{key}: {best * 1e3:.1f} ms for 10 s at 48 kHz"


def _timed_render(key: str, seed: int) -> float:
    t0 = time.perf_counter()
    render_event(key, np.random.default_rng(seed), 10.0, 48000)
    return time.perf_counter() - t0


@pytest.mark.parametrize(
    "key,seconds,sr",
    [("no_such_kind", 1.0, 48000), (KEYS[0], 0.0, 48000), (KEYS[0], -1.0, 48000), (KEYS[0], float("nan"), 48000),
     (KEYS[0], 0.001, 48000), (KEYS[0], 1.0, 0), (KEYS[0], 1.0, 44100.5)],
)
def test_render_event_refuses_nonsense(key, seconds, sr):
    with pytest.raises(LarcqError):
        render_event(key, np.random.default_rng(0), seconds, sr)


def test_event_kinds_have_distinct_spectra():
    """Kind-average log-mel shapes differ pairwise, and held-out renders sit nearest their own kind."""
    sr, seconds = 32000, 3.0
    centroids = {
        key: np.mean([band_profile(render_event(key, np.random.default_rng(s), seconds, sr), sr) for s in range(3)], 0)
        for key in KEYS
    }
    worst = max((cosine(centroids[a], centroids[b]), a, b) for a, b in itertools.combinations(KEYS, 2))
    assert worst[0] < MAX_PAIR_COSINE, f"kinds {worst[1]} and {worst[2]} sound alike: cosine {worst[0]:.3f}"

    hits = 0
    held_out = (100, 101)
    for key, seed in itertools.product(KEYS, held_out):
        v = band_profile(render_event(key, np.random.default_rng(seed), seconds, sr), sr)
        hits += max(KEYS, key=lambda k: cosine(v, centroids[k])) == key
    assert hits / (len(KEYS) * len(held_out)) >= MIN_NEAREST_ACCURACY


# --------------------------------------------------------------------------- the benchmark


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return write_demo_benchmark(tmp_path_factory.mktemp("demo") / "bench", SPEC)


def test_layout_and_queries_csv(bench):
    ids = [f"long_{i:03d}.{SPEC.formats[i % 2]}" for i in range(SPEC.n_audios)]
    assert sorted(p.name for p in (bench / "audios").iterdir()) == ids
    rows = read_csv(bench / "queries.csv")
    n_splits = SPEC.events_per_audio[1]
    assert rows[0] == ["audio_id", "query"] + [f"split_{i}" for i in range(1, n_splits + 1)]
    assert [r[0] for r in rows[1:]] == ids
    lengths = set()
    by_caption = {c: k.key for k in EVENT_KINDS for c in k.captions}
    prov = provenance(bench)
    for audio_id, query, *cells in rows[1:]:
        assert len(cells) == n_splits
        splits = [c for c in cells if c]
        assert cells == splits + [""] * (n_splits - len(splits))  # ragged rows: trailing cells empty
        assert SPEC.events_per_audio[0] <= len(splits) <= n_splits
        lengths.add(len(splits))
        assert query == ", ".join(s.rstrip(".") for s in splits).lower() == build_query(splits)
        kinds = [by_caption[s] for s in splits]
        assert len(set(kinds)) == len(kinds)  # distinct kinds within one audio
        assert [(r["event_kind"], r["caption"]) for r in prov[audio_id]] == list(zip(kinds, splits))
    assert len(lengths) > 1  # this seed draws ragged rows, so the empty-cell path is exercised


def test_audio_files_decode_at_expected_rates(bench):
    prov = provenance(bench)
    for i in range(SPEC.n_audios):
        fmt = SPEC.formats[i % len(SPEC.formats)]
        path = bench / "audios" / f"long_{i:03d}.{fmt}"
        info = sf.info(path)
        sr = SPEC.sample_rates[i % len(SPEC.sample_rates)]
        assert (info.samplerate, info.channels, info.format, info.subtype) == (sr, 1, fmt.upper(), "PCM_16")
        x, got_sr = sf.read(path, dtype="float32")
        assert got_sr == sr and np.all(np.isfinite(x)) and 0.1 < np.max(np.abs(x)) <= 0.9
        events = prov[path.name]
        assert len(x) == round(float(events[-1]["end_s"]) * sr)
        _check_event_times(x, sr, events)


def _check_event_times(x: np.ndarray, sr: int, events: list[dict[str, str]]) -> None:
    tol = 1.5 / sr  # times are written with 6 decimals, samples are whole
    assert float(events[0]["start_s"]) == 0.0
    for pos, ev in enumerate(events, start=1):
        start, end = float(ev["start_s"]), float(ev["end_s"])
        assert int(ev["position"]) == pos
        assert SPEC.event_seconds[0] - tol <= end - start <= SPEC.event_seconds[1] + tol
        assert np.max(np.abs(x[round(start * sr) : round(end * sr)])) > 0.1  # the event sounds
    for prev, nxt in zip(events, events[1:]):
        gap_start, gap_end = float(prev["end_s"]), float(nxt["start_s"])
        assert abs(gap_end - gap_start - SPEC.gap_seconds) <= tol
        assert not np.any(x[round(gap_start * sr) : round(gap_end * sr)])  # silence between events


def test_same_seed_is_byte_identical_other_seed_differs(bench, tmp_path):
    again = tree_hashes(write_demo_benchmark(tmp_path / "again", SPEC))
    assert again == tree_hashes(bench)
    other = tree_hashes(write_demo_benchmark(tmp_path / "other", replace(SPEC, seed=8)))
    assert other.keys() == again.keys()
    assert all(other[k] != again[k] for k in again)  # every audio and both CSVs change


def test_rewriting_in_place_is_allowed_but_foreign_files_are_refused(tmp_path):
    small = replace(SPEC, n_audios=2, event_seconds=(0.5, 0.5))
    out = write_demo_benchmark(tmp_path / "b", small)
    before = tree_hashes(out)
    assert tree_hashes(write_demo_benchmark(out, small)) == before
    (out / "audios" / "stray.wav").write_bytes(b"")
    with pytest.raises(LarcqError, match="stray.wav"):
        write_demo_benchmark(out, small)


@pytest.mark.parametrize(
    "changes",
    [
        {"n_audios": 0},
        {"n_audios": 2.5},
        {"events_per_audio": (0, 2)},
        {"events_per_audio": (3, 2)},
        {"events_per_audio": (1, len(EVENT_KINDS) + 1)},
        {"events_per_audio": (1,)},
        {"event_seconds": (2.0, 1.0)},
        {"event_seconds": (0.0, 1.0)},
        {"event_seconds": (1.0, float("inf"))},
        {"gap_seconds": -0.1},
        {"sample_rates": ()},
        {"sample_rates": (1000,)},
        {"sample_rates": (44100.0,)},
        {"formats": ("mp3",)},
        {"formats": ()},
        {"seed": -1},
    ],
)
def test_nonsense_specs_are_refused(changes, tmp_path):
    with pytest.raises(LarcqError):
        write_demo_benchmark(tmp_path / "b", replace(SPEC, **changes))
    assert not (tmp_path / "b").exists()  # refused before writing anything


def test_default_spec_is_quick(tmp_path):
    t0 = time.perf_counter()
    out = write_demo_benchmark(tmp_path / "default")
    elapsed = time.perf_counter() - t0
    assert len(read_csv(out / "queries.csv")) == DemoBenchmarkSpec().n_audios + 1
    assert elapsed < 10.0, f"default benchmark took {elapsed:.1f} s"
