"""The demo benchmark written in the LARCQ layout, and the sound_world events it is built from."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from larcq_ray.core.errors import LarcqError
from larcq_ray.offline import sound_world as sw
from larcq_ray.offline.demo_benchmark import DemoBenchmarkSpec, query_captions, write_demo_benchmark
from larcq_ray.synthesize.query import build_query

SPEC = DemoBenchmarkSpec(n_audios=5, events_per_audio=(2, 4), event_seconds=(1.0, 2.0), gap_seconds=0.25, seed=7)
ALL_SPECS = sw.all_event_specs()
# 16-bit files: quantization moves a quiet (-26 dBFS) peak by < 0.01 dB
PEAK_TOL_DB = sw.LOUDNESS_JITTER_DB + 0.01


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


def spec_of_caption() -> dict[str, sw.EventSpec]:
    """Every training phrasing -> the one event (kind and attribute values) it describes."""
    out: dict[str, sw.EventSpec] = {}
    for spec in ALL_SPECS:
        for c in sw.captions(spec, "train"):
            assert out.setdefault(c, spec) == spec, f"{c!r} describes both {out[c]} and {spec}"
    return out


def peak_db(x: np.ndarray) -> float:
    return float(20.0 * np.log10(np.max(np.abs(x))))


# --------------------------------------------------------------------------- the events: sound_world kinds


def test_every_event_has_comma_free_captions_naming_only_it():
    by_caption = spec_of_caption()  # a caption names exactly one kind and attribute set
    assert len(sw.KINDS) >= 16
    for spec in ALL_SPECS:
        options = query_captions(spec)
        assert len(options) >= 3, spec
        assert set(options) <= set(sw.captions(spec, "train"))
        for c in options:
            # captions are comma-joined into queries, so a comma inside one would blur the splits
            assert "," not in c and c == c.strip() and c == c.lower() and not c.endswith("."), c
            assert by_caption[c] == spec and build_query([c]) == c


@pytest.mark.parametrize("name", sw.KIND_NAMES)
def test_every_kind_renders_valid_non_silent_audio_at_benchmark_rates(name):
    specs = [s for s in ALL_SPECS if s.kind == name]
    for i, spec in enumerate(specs):
        level = sw.LOUDNESS_PEAK_DBFS[spec.attributes["loudness"]]
        for sr, seconds in ((48000, 1.5), (32000, 2.0), (44100, 0.02), (8000, 1.0), (192000, 0.3)):
            x = sw.render(spec, np.random.default_rng(i), seconds, sr)
            assert x.dtype == np.float32 and x.ndim == 1
            assert len(x) == round(seconds * sr)
            assert np.all(np.isfinite(x))
            assert abs(peak_db(x) - level) <= sw.LOUDNESS_JITTER_DB + 1e-3, (spec, sr, peak_db(x))
            assert float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) > 1e-3 * 10 ** (level / 20), (spec, sr)
            if seconds >= 1.0:
                peak = float(np.max(np.abs(x)))
                assert abs(x[0]) < 0.02 * peak and abs(x[-1]) < 0.02 * peak, (spec, sr)  # faded: no clicks
    spec = sw.EventSpec(name, {"loudness": "loud"})
    same = sw.render(spec, np.random.default_rng(5), 1.0, 32000)
    assert np.array_equal(same, sw.render(spec, np.random.default_rng(5), 1.0, 32000))
    assert not np.array_equal(same, sw.render(spec, np.random.default_rng(6), 1.0, 32000))


@pytest.mark.parametrize(
    "name,seconds,sr",
    [("no_such_kind", 1.0, 48000), ("hiss", 0.0, 48000), ("hiss", -1.0, 48000), ("hiss", float("nan"), 48000),
     ("hiss", 0.001, 48000), ("hiss", "long", 48000), ("hiss", 1.0, 0), ("hiss", 1.0, 44100.5), ("hiss", 1.0, 999)],
)
def test_render_refuses_nonsense(name, seconds, sr):
    with pytest.raises(LarcqError):
        sw.render(sw.EventSpec(name), np.random.default_rng(0), seconds, sr)


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
    assert read_csv(bench / "provenance.csv")[0] == ["audio_id", "position", "event_kind", "caption", "start_s",
                                                     "end_s"]
    lengths, loudness = set(), set()
    by_caption = spec_of_caption()
    prov = provenance(bench)
    for audio_id, query, *cells in rows[1:]:
        assert len(cells) == n_splits
        splits = [c for c in cells if c]
        assert cells == splits + [""] * (n_splits - len(splits))  # ragged rows: trailing cells empty
        assert SPEC.events_per_audio[0] <= len(splits) <= n_splits
        lengths.add(len(splits))
        assert query == ", ".join(s.rstrip(".") for s in splits).lower() == build_query(splits)
        events = [by_caption[s] for s in splits]
        assert all(s in query_captions(e) for s, e in zip(splits, events))  # train phrasings without commas
        kinds = [e.kind for e in events]
        assert len(set(kinds)) == len(kinds)  # distinct kinds within one audio
        assert [(r["event_kind"], r["caption"]) for r in prov[audio_id]] == list(zip(kinds, splits))
        loudness |= {e.attributes["loudness"] for e in events}
    assert len(lengths) > 1  # this seed draws ragged rows, so the empty-cell path is exercised
    assert loudness == {"quiet", "loud"}  # attributes are drawn, not fixed


def test_audio_files_decode_at_expected_rates(bench):
    prov = provenance(bench)
    by_caption = spec_of_caption()
    for i in range(SPEC.n_audios):
        fmt = SPEC.formats[i % len(SPEC.formats)]
        path = bench / "audios" / f"long_{i:03d}.{fmt}"
        info = sf.info(path)
        sr = SPEC.sample_rates[i % len(SPEC.sample_rates)]
        assert (info.samplerate, info.channels, info.format, info.subtype) == (sr, 1, fmt.upper(), "PCM_16")
        x, got_sr = sf.read(path, dtype="float32")
        assert got_sr == sr and np.all(np.isfinite(x)) and np.max(np.abs(x)) < 1.0
        events = prov[path.name]
        assert len(x) == round(float(events[-1]["end_s"]) * sr)
        _check_event_times(x, sr, events, by_caption)


def _check_event_times(x: np.ndarray, sr: int, events: list[dict[str, str]], by_caption) -> None:
    tol = 1.5 / sr  # times are written with 6 decimals, samples are whole
    assert float(events[0]["start_s"]) == 0.0
    for pos, ev in enumerate(events, start=1):
        start, end = float(ev["start_s"]), float(ev["end_s"])
        assert int(ev["position"]) == pos
        assert SPEC.event_seconds[0] - tol <= end - start <= SPEC.event_seconds[1] + tol
        # the event sounds, at the loudness its caption names
        level = sw.LOUDNESS_PEAK_DBFS[by_caption[ev["caption"]].attributes["loudness"]]
        assert abs(peak_db(x[round(start * sr) : round(end * sr)]) - level) <= PEAK_TOL_DB, ev
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
        {"events_per_audio": (1, len(sw.KINDS) + 1)},
        {"events_per_audio": (1,)},
        {"event_seconds": (2.0, 1.0)},
        {"event_seconds": (0.0, 1.0)},
        {"event_seconds": (0.001, 1.0)},
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


def test_every_kind_fits_in_one_audio(tmp_path):
    """events_per_audio may reach the number of kinds: each audio then holds every kind once."""
    n = len(sw.KINDS)
    out = write_demo_benchmark(tmp_path / "all", DemoBenchmarkSpec(
        n_audios=1, events_per_audio=(n, n), event_seconds=(0.05, 0.05), gap_seconds=0.0, sample_rates=(16000,)))
    kinds = [r["event_kind"] for r in provenance(out)["long_000.wav"]]
    assert sorted(kinds) == sorted(sw.KIND_NAMES)


def test_default_spec_writes_every_audio(tmp_path):
    out = write_demo_benchmark(tmp_path / "default")
    assert len(read_csv(out / "queries.csv")) == DemoBenchmarkSpec().n_audios + 1
