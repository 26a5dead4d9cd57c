"""One long audio from its plan: decode the clips, bring them to one rate, join them, write it.

Runs in plain Ray tasks, one long audio per task (`run_render_tasks`). Reads and writes go through
`larcq_ray.core.storage`, so the source and the output may be local folders or object-store URIs.

Why not Ray Data here: a render is about 0.1 s of work whose input is a plan (a short JSON text)
and whose output is a status row; the audio goes from the worker straight to the store, so Ray
Data's streaming and backpressure have nothing to manage, and its per-task scheduling costs as much
as the work. In Ray Data 2.60 a finished task keeps its concurrency slot until the executor's next
scheduling pass (its metadata is fetched on a thread and registered a pass later), and that pass
blocks in `ray.wait(all running tasks, timeout=0.1)` while any other task runs; and for about the
first second of each execution its resource limits are zero (the autoscaling coordinator has not
answered yet), so it runs one task at a time. With 2 workers that came to about 0.9 renders
running at once on average, and no speed-up over 1 worker (benchmarks/bench_synthesis.py). A
window of Ray tasks refills a slot the moment its task ends (`ray.wait(num_returns=1)`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import soundfile as sf

from larcq_ray.core.stage import Batch, Resources, Stage, run_in_task, cluster_cpus, resolve
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
    """Render and write each planned long audio; a failure is a row with its reason."""
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
    """Task stage: one planned long audio per batch, rendered and written (`render_batch`)."""

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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:240] if text else ""


def run_render_tasks(stage: Stage, batches: list[Batch], workers: int | None) -> Iterator[Batch]:
    """Each batch through a task stage in its own Ray task; results as tasks finish, in any order.

    At most `workers` tasks run at once (None: the cluster's CPUs, with as many more queued so a
    worker never waits for the driver). Same contract as `map_stage`: set up once per worker
    process, out-of-memory splits and failed rows by `run_batch`; a task Ray itself could not run
    (its worker died, it was killed for memory) comes back as the batch's rows marked failed.
    """
    import ray

    res = resolve(stage.resources())
    opts: dict = dict(num_cpus=res.cpus, scheduling_strategy="SPREAD")  # as Ray Data places its tasks
    if res.memory_mb:
        opts["memory"] = res.memory_mb * 2**20
    if workers:
        window = workers
    else:
        window = 2 * max(1, int(cluster_cpus() // max(res.cpus, 1e-9)))
    task = ray.remote(run_in_task).options(**opts)
    stage_ref = ray.put(stage)  # shipped once, not once per task
    todo = iter(batches)
    running: dict = {}
    while True:
        while len(running) < window:
            batch = next(todo, None)
            if batch is None:
                break
            running[task.remote(batch, stage_ref)] = batch
        if not running:
            return
        done, _ = ray.wait(list(running), num_returns=1)
        batch = running.pop(done[0])
        try:
            out = ray.get(done[0])
        except ray.exceptions.RayError as e:  # the task never returned: its rows fail, with the reason
            cause = getattr(e, "cause", None) or e
            out = stage.failed_batch(batch, f"{stage.name}: {type(cause).__name__}: {_first_line(cause)}")
        yield out
