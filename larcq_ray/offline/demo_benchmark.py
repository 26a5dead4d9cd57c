"""A small synthetic benchmark in the LARCQ layout, for demos and end-to-end tests.

    <out_dir>/audios/long_000.wav, long_001.flac, ...   long audios: distinct events, silence between
    <out_dir>/queries.csv      audio_id, query, split_1 ... split_N (the LARCQ layout)
    <out_dir>/provenance.csv   which event kind lies where, for checking and debugging

Events are `sound_world` events: each audio holds distinct kinds, each with random attribute
values (loudness, and pitch / speed where the kind has them), rendered by `sound_world.render`.
Each event's caption is one of `sound_world.captions(event, "train")`, drawn among those without
a comma (queries are comma-joined). Queries are built as the LARCQ research code builds them
from per-event captions: trailing period removed, joined with ", ", lower-cased; split_i keeps
event i's caption as written. The provenance `event_kind` column names the sound_world kind.
Every audio draws from its own seeded generator, so files are byte-identical for a seed.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from larcq_ray.core.errors import LarcqError
from larcq_ray.offline import sound_world
from larcq_ray.offline.dsp import MIN_EVENT_S
from larcq_ray.offline.sound_world import EventSpec
from larcq_ray.synthesize.query import build_query

FORMATS = {"wav": "WAV", "flac": "FLAC"}  # file extension -> libsndfile container
SAMPLE_RATE_RANGE = (8000, 192000)
PROVENANCE_HEADER = ("audio_id", "position", "event_kind", "caption", "start_s", "end_s")


@dataclass(frozen=True)
class DemoBenchmarkSpec:
    n_audios: int = 16
    events_per_audio: tuple[int, int] = (3, 5)  # inclusive range, distinct kinds within one audio
    event_seconds: tuple[float, float] = (6.0, 10.0)
    gap_seconds: float = 0.5  # silence between events
    sample_rates: tuple[int, ...] = (48000, 44100, 32000)  # cycled per audio, so the index must resample
    formats: tuple[str, ...] = ("wav", "flac")  # cycled per audio
    seed: int = 0


@dataclass(frozen=True)
class PlannedEvent:
    event: EventSpec  # a sound_world kind and its attribute values
    caption: str
    start: int  # samples
    length: int  # samples


@dataclass(frozen=True)
class PlannedAudio:
    audio_id: str
    sample_rate: int
    fmt: str
    events: tuple[PlannedEvent, ...]
    total: int  # samples


# --------------------------------------------------------------------------- validation


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _pair(value: object, name: str) -> tuple:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise LarcqError(f"demo benchmark: {name} must be a (min, max) pair, got {value!r}")
    return tuple(value)


def validate_spec(spec: DemoBenchmarkSpec) -> None:
    """Refuse specs that cannot make a sensible benchmark, naming the field at fault."""
    if not _is_int(spec.n_audios) or spec.n_audios < 1:
        raise LarcqError(f"demo benchmark: n_audios must be an integer >= 1, got {spec.n_audios!r}")
    lo, hi = _pair(spec.events_per_audio, "events_per_audio")
    if not (_is_int(lo) and _is_int(hi) and 1 <= lo <= hi):
        raise LarcqError(f"demo benchmark: events_per_audio must be integers 1 <= min <= max, got {(lo, hi)!r}")
    if hi > len(sound_world.KINDS):
        raise LarcqError(
            f"demo benchmark: events_per_audio max {hi} exceeds the {len(sound_world.KINDS)} event kinds "
            "(events within one audio are distinct kinds)"
        )
    s_lo, s_hi = _pair(spec.event_seconds, "event_seconds")
    if not (_is_num(s_lo) and _is_num(s_hi) and MIN_EVENT_S <= s_lo <= s_hi):
        raise LarcqError(
            f"demo benchmark: event_seconds must be numbers {MIN_EVENT_S} <= min <= max, got {(s_lo, s_hi)!r}"
        )
    if not (_is_num(spec.gap_seconds) and spec.gap_seconds >= 0):
        raise LarcqError(f"demo benchmark: gap_seconds must be a number >= 0, got {spec.gap_seconds!r}")
    rates = tuple(spec.sample_rates) if isinstance(spec.sample_rates, (tuple, list)) else ()
    if not rates or not all(_is_int(r) and SAMPLE_RATE_RANGE[0] <= r <= SAMPLE_RATE_RANGE[1] for r in rates):
        raise LarcqError(
            f"demo benchmark: sample_rates must be a non-empty list of integers in "
            f"{SAMPLE_RATE_RANGE[0]}..{SAMPLE_RATE_RANGE[1]} Hz, got {spec.sample_rates!r}"
        )
    fmts = tuple(spec.formats) if isinstance(spec.formats, (tuple, list)) else ()
    if not fmts or not all(f in FORMATS for f in fmts):
        raise LarcqError(f"demo benchmark: formats must be a non-empty list of {sorted(FORMATS)}, got {spec.formats!r}")
    if not _is_int(spec.seed) or spec.seed < 0:
        raise LarcqError(f"demo benchmark: seed must be an integer >= 0, got {spec.seed!r}")


# --------------------------------------------------------------------------- planning and rendering


def _audio_rng(spec: DemoBenchmarkSpec, index: int) -> np.random.Generator:
    """One generator per audio: audio i does not change when n_audios does."""
    return np.random.default_rng(np.random.SeedSequence((int(spec.seed), index)))


def audio_id_for(index: int, n_audios: int, fmt: str) -> str:
    width = max(3, len(str(n_audios - 1)))
    return f"long_{index:0{width}d}.{fmt}"


def _draw_event(name: str, rng: np.random.Generator) -> EventSpec:
    """Kind `name` with each of its attributes (loudness, pitch, speed) drawn uniformly."""
    attrs = ("loudness", *sound_world.kind(name).attributes)
    return EventSpec(name, {a: sound_world.ATTRIBUTE_VALUES[a][int(rng.integers(2))] for a in attrs})


def query_captions(event: EventSpec) -> list[str]:
    """The training phrasings of `event` usable as a query part: those without a comma."""
    return [c for c in sound_world.captions(event, "train") if "," not in c]


def plan_audio(spec: DemoBenchmarkSpec, index: int, rng: np.random.Generator) -> PlannedAudio:
    """Draw the events of audio `index`: distinct kinds, attributes, one caption each, lengths and positions."""
    sr = int(spec.sample_rates[index % len(spec.sample_rates)])
    fmt = spec.formats[index % len(spec.formats)]
    lo, hi = spec.events_per_audio
    n_events = int(rng.integers(lo, hi + 1))
    kinds = rng.choice(len(sound_world.KIND_NAMES), size=n_events, replace=False)
    gap = int(round(spec.gap_seconds * sr))
    events, cursor = [], 0
    for k in kinds:
        event = _draw_event(sound_world.KIND_NAMES[int(k)], rng)
        options = query_captions(event)
        caption = options[int(rng.integers(len(options)))]
        length = int(round(rng.uniform(*spec.event_seconds) * sr))
        events.append(PlannedEvent(event, caption, cursor, length))
        cursor += length + gap
    total = cursor - gap
    return PlannedAudio(audio_id_for(index, spec.n_audios, fmt), sr, fmt, tuple(events), total)


def render_audio(plan: PlannedAudio, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(plan.total, dtype=np.float32)  # gaps stay silent
    for ev in plan.events:
        samples = sound_world.render(ev.event, rng, ev.length / plan.sample_rate, plan.sample_rate)[: ev.length]
        out[ev.start : ev.start + len(samples)] = samples
    return out


# --------------------------------------------------------------------------- writing


def _prepare_dirs(out_dir: Path, plans: list[PlannedAudio]) -> Path:
    """Create out_dir/audios; refuse one holding files we would not write (they would join the corpus)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LarcqError(f"demo benchmark: {out_dir} exists and is not a folder")
    audios = out_dir / "audios"
    if audios.exists() and not audios.is_dir():
        raise LarcqError(f"demo benchmark: {audios} exists and is not a folder")
    if audios.is_dir():
        ours = {p.audio_id for p in plans}
        strangers = sorted(p.name for p in audios.iterdir() if p.name not in ours)
        if strangers:
            raise LarcqError(
                f"demo benchmark: {audios} already holds files this benchmark would not write "
                f"({', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''}); "
                "they would be indexed as part of the corpus: use an empty or new folder"
            )
    audios.mkdir(parents=True, exist_ok=True)
    return audios


def _write_csv(path: Path, header: list[str] | tuple[str, ...], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")  # '\n' everywhere: same bytes on every OS
        writer.writerow(header)
        writer.writerows(rows)


def _query_rows(plans: list[PlannedAudio], n_splits: int) -> list[list[str]]:
    rows = []
    for p in plans:
        captions = [ev.caption for ev in p.events]
        rows.append([p.audio_id, build_query(captions)] + captions + [""] * (n_splits - len(captions)))
    return rows


def _provenance_rows(plans: list[PlannedAudio]) -> list[list[str]]:
    rows = []
    for p in plans:
        for pos, ev in enumerate(p.events, start=1):
            start_s, end_s = ev.start / p.sample_rate, (ev.start + ev.length) / p.sample_rate
            rows.append([p.audio_id, str(pos), ev.event.kind, ev.caption, f"{start_s:.6f}", f"{end_s:.6f}"])
    return rows


def write_demo_benchmark(out_dir: Path, spec: DemoBenchmarkSpec = DemoBenchmarkSpec()) -> Path:
    """Write the benchmark under `out_dir` (audios/, queries.csv, provenance.csv); return out_dir."""
    validate_spec(spec)
    out_dir = Path(out_dir)
    rngs = [_audio_rng(spec, i) for i in range(spec.n_audios)]
    plans = [plan_audio(spec, i, rng) for i, rng in enumerate(rngs)]
    audios = _prepare_dirs(out_dir, plans)
    for plan, rng in zip(plans, rngs):
        # The planning rng continues into rendering: still one deterministic stream per audio.
        samples = render_audio(plan, rng)
        sf.write(audios / plan.audio_id, samples, plan.sample_rate, subtype="PCM_16", format=FORMATS[plan.fmt])
    n_splits = int(spec.events_per_audio[1])  # from the spec, so the header does not depend on the draws
    header = ["audio_id", "query"] + [f"split_{i}" for i in range(1, n_splits + 1)]
    _write_csv(out_dir / "queries.csv", header, _query_rows(plans, n_splits))
    _write_csv(out_dir / "provenance.csv", PROVENANCE_HEADER, _provenance_rows(plans))
    return out_dir
