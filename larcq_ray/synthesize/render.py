"""One long audio from its plan: decode the clips, bring them to one rate, join them, write it.

Runs in Ray tasks, one long audio per row. Reads and writes go through `larcq_ray.core.storage`, so
the source and the output may be local folders or object-store URIs.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from larcq_ray.core.stage import Resources
from larcq_ray.core.storage import Location, open_location
from larcq_ray.synthesize.plan import LongAudioPlan

PEAK = 0.999  # the loudest sample after joining; louder audio is scaled down, never clipped


def load_clip(loc: Location, name: str, rate: int) -> np.ndarray:
    """Mono float32 at `rate` (channels averaged; other rates resampled with soxr)."""
    import soxr

    with loc.fs.open_input_file(loc.path(name)) as f:
        data, sr = sf.read(f, dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError(f"{name}: no audio frames")
    mono = data.mean(axis=1)
    if sr != rate:
        mono = soxr.resample(mono, sr, rate, quality="HQ").astype(np.float32)
    return mono


def join_clips(waves: list[np.ndarray], rate: int, gap_s: float, crossfade_s: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The long audio and each clip's (start, end) sample span in it."""
    gap, fade = int(round(gap_s * rate)), int(round(crossfade_s * rate))
    spans, pieces, cursor = [], [], 0
    if fade > 0:
        out = waves[0].copy()
        spans.append((0, len(out)))
        t = (np.arange(fade, dtype=np.float64) + 0.5) / fade
        fade_out, fade_in = np.cos(0.5 * np.pi * t), np.sin(0.5 * np.pi * t)  # equal power
        for w in waves[1:]:
            if len(w) <= fade or len(out) < fade:
                raise ValueError("a clip is shorter than the crossfade")
            start = len(out) - fade
            mixed = out[start:] * fade_out + w[:fade] * fade_in
            out = np.concatenate([out[:start], mixed.astype(np.float32), w[fade:]])
            spans.append((start, start + len(w)))
        return out.astype(np.float32), spans
    for i, w in enumerate(waves):
        if i and gap:
            pieces.append(np.zeros(gap, dtype=np.float32))
            cursor += gap
        pieces.append(w)
        spans.append((cursor, cursor + len(w)))
        cursor += len(w)
    return np.concatenate(pieces).astype(np.float32), spans


def render_long_audio(plan: LongAudioPlan, audio_dir: str, rate: int, gap_s: float, crossfade_s: float
                      ) -> tuple[bytes, list[dict], float]:
    """(samples, provenance rows, gain applied to stay under PEAK)."""
    loc = open_location(audio_dir)
    waves = [load_clip(loc, c.file, rate) for c in plan.clips]
    audio, spans = join_clips(waves, rate, gap_s, crossfade_s)
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    gain = PEAK / peak if peak > PEAK else 1.0
    if gain != 1.0:
        audio = (audio * gain).astype(np.float32)
    rows = [{"audio_id": plan.audio_id, "position": i + 1, "source_file": c.file, "caption": c.caption,
             "start_s": s / rate, "end_s": e / rate}
            for i, (c, (s, e)) in enumerate(zip(plan.clips, spans))]
    return audio, rows, gain


def encode_wav(audio: np.ndarray, rate: int, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, subtype=subtype, format="WAV")  # no timestamps: same input, same bytes
    return buf.getvalue()


def render_batch(batch: dict, *, audio_dir: str, out_dir: str, rate: int, gap_s: float, crossfade_s: float,
                 subtype: str) -> dict:
    """Ray Data task: render and write each planned long audio; a failure is a row with its reason."""
    out_loc = open_location(out_dir)
    result = {"audio_id": [], "status": [], "error": [], "duration_s": [], "gain": [], "provenance": []}
    for text in batch["plan"]:
        plan = LongAudioPlan.from_json(str(text))
        try:
            audio, rows, gain = render_long_audio(plan, audio_dir, rate, gap_s, crossfade_s)
            out_loc.write_bytes(f"audios/{plan.audio_id}", encode_wav(audio, rate, subtype))
            status, error, duration = "ok", "", len(audio) / rate
        except Exception as e:  # noqa: BLE001 - any clip failure fails this audio only, with its reason
            rows, gain, duration = [], 1.0, 0.0
            status, error = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        result["audio_id"].append(plan.audio_id)
        result["status"].append(status)
        result["error"].append(error)
        result["duration_s"].append(duration)
        result["gain"].append(gain)
        result["provenance"].append(json.dumps(rows))
    return {k: np.asarray(v) for k, v in result.items()}


@dataclass
class RenderStage:
    """Ray Data task stage: one planned long audio per batch, rendered and written (`render_batch`)."""

    audio_dir: str
    out_dir: str
    rate: int
    gap_s: float
    crossfade_s: float
    subtype: str
    workers: int | None = None  # at most this many renders at once
    name: str = "render"

    def resources(self) -> Resources:
        return Resources(cpus=1, tasks=self.workers)

    def setup(self) -> None:
        pass

    def process_batch(self, batch: dict) -> dict:
        return render_batch(batch, audio_dir=self.audio_dir, out_dir=self.out_dir, rate=self.rate, gap_s=self.gap_s,
                            crossfade_s=self.crossfade_s, subtype=self.subtype)

    def failed_batch(self, batch: dict, reason: str) -> dict:
        ids = [LongAudioPlan.from_json(str(t)).audio_id for t in batch["plan"]]
        n = len(ids)
        return {"audio_id": np.asarray(ids), "status": np.asarray(["failed"] * n), "error": np.asarray([reason] * n),
                "duration_s": np.zeros(n), "gain": np.ones(n), "provenance": np.asarray(["[]"] * n)}
