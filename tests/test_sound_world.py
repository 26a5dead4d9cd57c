"""sound_world: a catalogue of labelled, attribute-controlled synthetic sound events."""

from __future__ import annotations

import csv
import functools
import itertools
import json

import numpy as np
import pytest
import soundfile as sf

from larcq_ray.offline import sound_world as sw
from larcq_ray.core.errors import LarcqError

SR = 48000


def _all_specs(loudness: str | None = None) -> list[sw.EventSpec]:
    """Every kind with every combination of its attributes (loudness fixed when given)."""
    out = []
    for k in sw.KINDS:
        names = ("loudness", *k.attributes)
        for vals in itertools.product(*[sw.ATTRIBUTE_VALUES[a] for a in names]):
            attrs = dict(zip(names, vals))
            if loudness is None or attrs["loudness"] == loudness:
                out.append(sw.EventSpec(k.name, attrs))
    return out


def test_catalogue_size_and_attributes():
    assert len(sw.KINDS) >= 32
    assert len(set(sw.KIND_NAMES)) == len(sw.KINDS)
    for k in sw.KINDS:
        assert set(k.attributes) <= {"pitch", "speed"}
    assert sum("pitch" in k.attributes for k in sw.KINDS) >= 3
    assert sum("speed" in k.attributes for k in sw.KINDS) >= 8


def test_event_spec_fills_defaults_and_validates():
    spec = sw.EventSpec("short_beeps")
    assert spec.attributes == {"loudness": "quiet", "pitch": "low", "speed": "slow"}
    assert hash(spec) == hash(sw.EventSpec("short_beeps", {"speed": "slow"}))
    with pytest.raises(LarcqError, match="unknown sound kind"):
        sw.EventSpec("dog_bark")
    with pytest.raises(LarcqError, match="no attribute"):
        sw.EventSpec("low_tone", {"pitch": "high"})
    with pytest.raises(LarcqError, match="not one of"):
        sw.EventSpec("siren", {"speed": "medium"})


@pytest.mark.parametrize("sample_rate", [48000, 16000])
def test_every_kind_renders_finite_nonsilent_unclipped(sample_rate):
    for i, spec in enumerate(_all_specs("loud")):
        x = sw.render(spec, np.random.default_rng(i), 1.5, sample_rate)
        assert x.dtype == np.float32 and x.ndim == 1 and len(x) == int(1.5 * sample_rate), spec
        assert np.all(np.isfinite(x)), spec
        peak = float(np.max(np.abs(x)))
        assert 0.3 < peak <= 1.0, (spec, peak)
        assert float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) > 1e-3, spec


def test_very_short_renders_are_not_silent():
    for i, spec in enumerate(_all_specs("quiet")):
        for sr in (16000, 48000):
            x = sw.render(spec, np.random.default_rng(i), 0.05, sr)
            assert np.all(np.isfinite(x)) and np.max(np.abs(x)) > 0.01, (spec, sr)


def test_render_is_deterministic_per_rng():
    for spec in sw.sample_events(40, np.random.default_rng(3)):
        a = sw.render(spec, np.random.default_rng(11), 1.0, SR)
        b = sw.render(spec, np.random.default_rng(11), 1.0, SR)
        c = sw.render(spec, np.random.default_rng(12), 1.0, SR)
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)


def test_render_rejects_bad_arguments():
    with pytest.raises(LarcqError, match="duration"):
        sw.render(sw.EventSpec("hiss"), np.random.default_rng(0), 0.0, SR)
    with pytest.raises(LarcqError, match="sample_rate"):
        sw.render(sw.EventSpec("hiss"), np.random.default_rng(0), 1.0, 100)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_loudness_attribute_sets_peak_and_rms_factor():
    factor = 10 ** ((sw.LOUDNESS_PEAK_DBFS["loud"] - sw.LOUDNESS_PEAK_DBFS["quiet"]) / 20)  # 20 dB -> 10x
    ratios = []
    for i, k in enumerate(sw.KINDS):
        quiet = sw.render(sw.EventSpec(k.name, {"loudness": "quiet"}), np.random.default_rng(i), 1.0, SR)
        loud = sw.render(sw.EventSpec(k.name, {"loudness": "loud"}), np.random.default_rng(i), 1.0, SR)
        # same rng -> same waveform, only the level differs: the exact factor
        assert _rms(loud) / _rms(quiet) == pytest.approx(factor, rel=1e-4), k.name
        for x, level in ((quiet, "quiet"), (loud, "loud")):
            peak_db = 20 * np.log10(np.max(np.abs(x)))
            assert abs(peak_db - sw.LOUDNESS_PEAK_DBFS[level]) <= sw.LOUDNESS_JITTER_DB + 1e-3, (k.name, peak_db)
        # independent renders: the factor holds up to the +-1 dB jitter on each side
        other = sw.render(sw.EventSpec(k.name, {"loudness": "loud"}), np.random.default_rng(1000 + i), 1.0, SR)
        ratios.append(np.max(np.abs(other)) / np.max(np.abs(quiet)))
    assert np.median(ratios) == pytest.approx(factor, rel=0.15)
    assert min(ratios) >= factor * 10 ** (-2 * sw.LOUDNESS_JITTER_DB / 20) - 1e-6


# --------------------------------------------------------------------------- captions


def test_captions_counts_lowercase_and_heldout_disjoint():
    for spec in _all_specs():
        train, held = sw.captions(spec, "train"), sw.captions(spec, "heldout")
        assert len(train) >= 4 and len(held) >= 2, spec
        assert len(set(train)) == len(train) and len(set(held)) == len(held), spec
        assert not set(train) & set(held), spec
        for c in train + held:
            assert c == c.lower() and c.strip() == c and "{" not in c and "  " not in c, c
            assert not c.endswith("."), c


def test_heldout_phrasings_never_equal_any_training_phrasing():
    all_train = {c for spec in _all_specs() for c in sw.captions(spec, "train", synonyms="all")}
    all_held = {c for spec in _all_specs() for c in sw.captions(spec, "heldout", synonyms="all")}
    assert not all_train & all_held


def test_all_synonyms_extend_the_cycled_phrasings():
    spec = sw.EventSpec("short_beeps", {"loudness": "quiet", "pitch": "high", "speed": "fast"})
    cycle, every = sw.captions(spec, "train"), sw.captions(spec, "train", synonyms="all")
    assert set(cycle) < set(every) and len(every) == len(set(every))
    # 3 quiet words x 3 high words x 3 fast words for "a {loud} {pitch} beep repeats {speedly}"
    assert sum(c.startswith(("a quiet", "a soft", "a faint")) and c.count(" beep repeats ") for c in every) == 27
    assert sw.captions(sw.EventSpec("hiss", {"loudness": "loud"}), "train", "all") == \
        sw.captions(sw.EventSpec("hiss", {"loudness": "loud"}), "train")  # one synonym: nothing to add
    with pytest.raises(LarcqError, match="synonyms"):
        sw.captions(spec, "train", synonyms="some")


def test_captions_mention_every_attribute():
    words = {
        "loudness": {"quiet": ("quiet", "soft", "faint"), "loud": ("loud",)},
        "pitch": {"low": ("low", "deep"), "high": ("high", "shrill")},
        "speed": {"slow": ("slow",), "fast": ("fast", "quick", "rapid")},
    }
    for spec in _all_specs():
        for c in sw.captions(spec, "train") + sw.captions(spec, "heldout"):
            for attr, value in spec.attributes.items():
                assert any(w in c for w in words[attr][value]), (spec, c)
    assert "a loud high beep repeats quickly" in sw.captions(
        sw.EventSpec("short_beeps", {"loudness": "loud", "pitch": "high", "speed": "fast"}), "train")
    with pytest.raises(LarcqError, match="split"):
        sw.captions(sw.EventSpec("hiss"), "test")


# --------------------------------------------------------------------------- sampling and datasets


def test_sample_events_covers_kinds_and_attribute_values():
    specs = sw.sample_events(3000, np.random.default_rng(0))
    assert {s.kind for s in specs} == set(sw.KIND_NAMES)
    for attr, values in sw.ATTRIBUTE_VALUES.items():
        seen = [s.attributes[attr] for s in specs if attr in s.attributes]
        assert set(seen) == set(values)
        assert 0.4 < seen.count(values[0]) / len(seen) < 0.6
    only = sw.sample_events(50, np.random.default_rng(1), kinds=["siren", "hiss"])
    assert {s.kind for s in only} == {"siren", "hiss"}
    assert sw.sample_events(20, np.random.default_rng(5)) == sw.sample_events(20, np.random.default_rng(5))
    with pytest.raises(LarcqError):
        sw.sample_events(3, np.random.default_rng(0), kinds=["nope"])


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_write_clip_dataset_layout_and_determinism(tmp_path):
    kw = dict(n_clips=8, seed=7, sample_rate=16000, duration_s=(0.5, 1.0))
    a = sw.write_clip_dataset(tmp_path / "a", **kw)
    b = sw.write_clip_dataset(tmp_path / "b", **kw)
    c = sw.write_clip_dataset(tmp_path / "c", **{**kw, "seed": 8})
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    want = [f"audio/clip_{i:05d}.wav" for i in range(8)] + ["captions.csv", "events.csv"]
    assert [str(p) for p in files] == want
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "events.csv").read_bytes() != (c / "events.csv").read_bytes()

    caps = _read_csv(a / "captions.csv")
    events = _read_csv(a / "events.csv")
    assert caps[0] == ["file_name", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5"]
    assert events[0][:3] == ["file_name", "kind", "attributes"]
    assert len(caps) == len(events) == 9
    for cap_row, ev_row in zip(caps[1:], events[1:]):
        assert cap_row[0] == ev_row[0]
        spec = sw.EventSpec(ev_row[1], json.loads(ev_row[2]))
        train = sw.captions(spec, "train")
        assert set(cap_row[1:]) <= set(train) and len(set(cap_row[1:])) == min(5, len(train))
        audio, sr = sf.read(a / "audio" / cap_row[0], dtype="float32")
        assert sr == 16000 and audio.ndim == 1
        assert 0.5 <= len(audio) / sr <= 1.0 and np.max(np.abs(audio)) > 0.01


def test_write_clip_dataset_contrast_pairs_flip_one_attribute(tmp_path):
    out = sw.write_clip_dataset(tmp_path, n_clips=9, seed=3, sample_rate=16000, duration_s=(0.3, 0.3),
                                synonyms="all", contrast=True)
    events = _read_csv(out / "events.csv")[1:]
    assert len(events) == 9
    for first, second in zip(events[0::2], events[1::2]):
        assert first[1] == second[1]  # same kind
        a, b = json.loads(first[2]), json.loads(second[2])
        assert sum(a[k] != b[k] for k in a) == 1, (a, b)
    for cap_row, ev_row in zip(_read_csv(out / "captions.csv")[1:], events):
        pool = sw.captions(sw.EventSpec(ev_row[1], json.loads(ev_row[2])), "train", synonyms="all")
        assert set(cap_row[1:]) <= set(pool) and len(set(cap_row[1:])) == 5


def test_write_clip_dataset_heldout_split(tmp_path):
    out = sw.write_clip_dataset(tmp_path, n_clips=4, seed=1, sample_rate=16000, duration_s=(0.3, 0.3), split="heldout")
    for cap_row, ev_row in zip(_read_csv(out / "captions.csv")[1:], _read_csv(out / "events.csv")[1:]):
        held = sw.captions(sw.EventSpec(ev_row[1], json.loads(ev_row[2])), "heldout")
        assert set(cap_row[1:]) == set(held)  # fewer than 5 phrasings: all of them, repeated
    with pytest.raises(LarcqError, match="split"):
        sw.write_clip_dataset(tmp_path / "x", n_clips=1, seed=0, split="valid")


# --------------------------------------------------------------------------- distinctness


@functools.lru_cache(maxsize=1)
def _clap_mel_filters() -> np.ndarray:
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(num_frequency_bins=513, num_mel_filters=64, min_frequency=50.0, max_frequency=14000.0,
                           sampling_rate=SR, norm=None, mel_scale="htk")


def _mean_log_mel(x: np.ndarray) -> np.ndarray:
    """Time-averaged log-mel as CLAP computes it (48 kHz, n_fft 1024, hop 480, 64 htk mels, 50 Hz-14 kHz, dB)."""
    mel = _clap_mel_filters()
    n_fft, hop = 1024, 480
    x = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    frames = x[np.arange(n_fft)[None, :] + hop * np.arange(1 + (len(x) - n_fft) // hop)[:, None]]
    power = np.abs(np.fft.rfft(frames * np.hanning(n_fft + 1)[:-1], axis=1)) ** 2
    db = (10 * np.log10(np.maximum(power @ mel, 1e-10))).mean(axis=0)
    return np.maximum(db, db.max() - 80.0) - (db.max() - 80.0)  # 80 dB range, like librosa's top_db


def test_kinds_are_distinct_in_mean_log_mel():
    """Nearest neighbour by cosine over every (kind, pitch, speed) render: 2nd renders find their kind."""
    specs = _all_specs("loud")
    feats = [[_mean_log_mel(sw.render(s, np.random.default_rng([r, i]), 3.0, SR)) for i, s in enumerate(specs)]
             for r in (0, 1)]
    ref, probe = (np.stack(f) / np.linalg.norm(np.stack(f), axis=1, keepdims=True) for f in feats)
    nearest = (probe @ ref.T).argmax(axis=1)
    hits = [specs[j].kind == specs[i].kind for i, j in enumerate(nearest)]
    misses = [(specs[i].kind, specs[j].kind) for i, j in enumerate(nearest) if specs[j].kind != specs[i].kind]
    assert np.mean(hits) >= 0.9, misses
