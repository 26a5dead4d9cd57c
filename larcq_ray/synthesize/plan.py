"""The seeded plan of a synthesized benchmark: which clips, in which order, make each long audio.

Planned on the driver, in one pass, from one seeded generator: the cap on clip reuse is a
benchmark-wide constraint, so the draws of audio k depend on those before it. The same source,
settings and seed always give the same plan, hence the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np

from larcq_ray.core.errors import LarcqError
from larcq_ray.synthesize.config import SynthesizeConfig
from larcq_ray.synthesize.source import Clip


@dataclass(frozen=True)
class PlannedClip:
    file: str
    caption: str
    sample_rate: int
    frames: int


@dataclass(frozen=True)
class LongAudioPlan:
    audio_id: str
    clips: tuple[PlannedClip, ...]

    def to_json(self) -> str:
        return json.dumps({"audio_id": self.audio_id, "clips": [c.__dict__ for c in self.clips]})

    @staticmethod
    def from_json(text: str) -> "LongAudioPlan":
        d = json.loads(text)
        return LongAudioPlan(d["audio_id"], tuple(PlannedClip(**c) for c in d["clips"]))


def output_rate(clips: list[Clip], cfg: SynthesizeConfig) -> int:
    """The configured rate, else the clips' own (the most common; ties: the highest)."""
    if cfg.sample_rate:
        return int(cfg.sample_rate)
    counts = Counter(c.sample_rate for c in clips)
    return max(counts, key=lambda r: (counts[r], r))


def total_duration_s(durations: np.ndarray, cfg: SynthesizeConfig) -> float:
    joins = len(durations) - 1
    return float(durations.sum() + joins * cfg.gap_s - joins * cfg.crossfade_s)


def plan_benchmark(clips: list[Clip], cfg: SynthesizeConfig) -> list[LongAudioPlan]:
    lo, hi = cfg.clip_range()
    if cfg.crossfade_s > 0:  # a clip must be longer than the two fades that overlap it
        short = [c for c in clips if c.duration_s <= 2 * cfg.crossfade_s]
        if short:
            raise LarcqError(f"{len(short)} clips are not longer than 2 x crossfade_s ({2 * cfg.crossfade_s} s), "
                             f"e.g. {short[0].file}: lower crossfade_s")
    if len(clips) < lo:
        raise LarcqError(f"only {len(clips)} usable clips, but every long audio needs at least {lo} distinct ones")
    rng = np.random.default_rng(cfg.seed)
    durations = np.array([c.duration_s for c in clips])
    uses = np.zeros(len(clips), dtype=np.int64)
    width = max(5, len(str(cfg.n_audios - 1)))
    plans = []
    for k in range(cfg.n_audios):
        for _ in range(cfg.max_draws):
            m = int(rng.integers(lo, hi + 1)) if hi > lo else lo
            eligible = np.flatnonzero(uses < cfg.max_clip_uses) if cfg.max_clip_uses else np.arange(len(clips))
            if len(eligible) < m:
                raise LarcqError(
                    f"long audio {k}: only {len(eligible)} clips are left under max_clip_uses={cfg.max_clip_uses} "
                    f"and it needs {m}; {cfg.n_audios} audios x {lo}-{hi} clips need more clips or a higher cap")
            pick = rng.choice(eligible, size=m, replace=False)  # distinct clips, in drawn order
            total = total_duration_s(durations[pick], cfg)
            if (cfg.min_duration_s is None or total >= cfg.min_duration_s) and \
               (cfg.max_duration_s is None or total <= cfg.max_duration_s):
                break
        else:
            raise LarcqError(
                f"long audio {k}: no draw of {lo}-{hi} clips met the total duration bounds "
                f"[{cfg.min_duration_s}, {cfg.max_duration_s}] s in {cfg.max_draws} tries "
                f"(clips last {durations.min():.1f}-{durations.max():.1f} s): widen the bounds or change clips_per_audio")
        uses[pick] += 1
        chosen = []
        for i in pick:
            c = clips[int(i)]
            if cfg.query_caption == "random":
                options = [cap for cap in c.captions if cap]
                caption = options[int(rng.integers(len(options)))]
            else:
                caption = c.captions[cfg.caption_columns.index(cfg.query_caption)]
            chosen.append(PlannedClip(c.file, caption, c.sample_rate, c.frames))
        plans.append(LongAudioPlan(f"{cfg.audio_id_prefix}{k:0{width}d}.wav", tuple(chosen)))
    return plans


def fingerprint(clips: list[Clip], cfg: SynthesizeConfig) -> str:
    """Hash of everything the output bytes depend on: settings and the source clip table."""
    h = hashlib.sha256()
    h.update(json.dumps(cfg.output_fingerprint_fields(), sort_keys=True, default=str).encode())
    for c in clips:
        h.update(json.dumps([c.file, c.captions, c.sample_rate, c.frames, c.channels]).encode())
    return h.hexdigest()[:16]
