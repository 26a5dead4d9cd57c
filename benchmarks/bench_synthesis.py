"""Synthesis throughput: long audios per second with 1 and 2 render workers, and the scaling ratio.

    python benchmarks/bench_synthesis.py [--clips 60] [--audios 40] [--clips-per-audio 5] [--repeats 3]

The source is Clotho-like: `--clips` mono 44.1 kHz WAV clips of 15-30 s (synthesized events)
and a captions CSV. Each run writes `--audios` long audios of `--clips-per-audio` clips
(75-150 s, as in Clotho_LARCQ) into a fresh folder. The Ray session declares 4 logical CPUs on
this 2-core machine, so the worker count (1 or 2) is the only limit on concurrent renders.

Measured in the same run, rounds interleaved, median of `--repeats` (after one warm-up round):
- the product: the whole `run_synthesize` (scan + plan + render + tables), `num_workers` 1 and 2;
- the render stage alone, three ways over the same plans:
  now: `run_render_tasks` (a window of Ray tasks, what `run_synthesize` uses);
  before: the previous Ray Data stage (`map_stage` over one block per long audio, TaskPoolStrategy);
  reference: bare Ray tasks calling `render_batch`, 1 or 2 in flight.
The last line sums it up: end-to-end scaling now, and the render stage's scaling before and now.
"""

from __future__ import annotations

import argparse
import dataclasses
import csv
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def make_source(root: Path, n_clips: int, seed: int = 0) -> tuple[Path, Path]:
    from larcq_ray.offline import sound_world

    rng = np.random.default_rng(seed)
    audio = root / "clips"
    audio.mkdir(parents=True)
    rows = []
    for i in range(n_clips):
        event = sound_world.EventSpec(sound_world.KIND_NAMES[i % len(sound_world.KINDS)], {"loudness": "loud"})
        x = sound_world.render(event, rng, float(rng.uniform(15, 30)), 44100)
        sf.write(audio / f"clip_{i:04d}.wav", x, 44100, subtype="PCM_16")
        captions = sound_world.captions(event, "train")
        rows.append([f"clip_{i:04d}.wav"] + [captions[j % len(captions)] for j in range(5)])
    csv_path = root / "captions.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
        w.writerows(rows)
    return csv_path, audio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=60)
    p.add_argument("--audios", type=int, default=40)
    p.add_argument("--clips-per-audio", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    import ray.data

    from larcq_ray.core.ray_session import _quiet_ray_data
    from larcq_ray.core.stage import map_stage
    from larcq_ray.synthesize.config import SynthesizeConfig
    from larcq_ray.synthesize.job import run_synthesize
    from larcq_ray.synthesize.plan import output_rate, plan_benchmark
    from larcq_ray.synthesize.render import RenderStage, render_batch, run_render_tasks
    from larcq_ray.synthesize.source import scan_source

    load_start = os.getloadavg()[0]
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    _quiet_ray_data()
    root = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    csv_path, audio = make_source(root, args.clips)
    n = args.audios
    base = dict(captions_csv=str(csv_path), audio_dir=str(audio), n_audios=n, clips_per_audio=args.clips_per_audio,
                seed=1, commit_every=8)
    clips = scan_source(SynthesizeConfig(**base))[0]
    plans = plan_benchmark(clips, SynthesizeConfig(**base))
    rate = output_rate(clips, SynthesizeConfig(**base))
    counter = iter(range(10**6))

    def fresh() -> Path:
        return root / f"out_{next(counter)}"

    @dataclasses.dataclass
    class TimedRender(RenderStage):
        """The render stage, with each render's start and end (wall clock) in a column `span`."""

        def process_batch(self, batch: dict) -> dict:
            t0 = time.time()
            out = super().process_batch(batch)
            out["span"] = np.asarray([[t0, time.time()]] * len(out["audio_id"]))
            return out

    spans: dict[tuple[str, int], list[float]] = {}

    def in_flight(rows: list) -> float:
        """Renders running at once, on average between the first start and the last end."""
        s = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
        return float((s[:, 1] - s[:, 0]).sum() / (s[:, 1].max() - s[:, 0].min()))

    def stage(out: Path, workers: int) -> RenderStage:
        return TimedRender(audio_dir=str(audio), out_dir=str(out), rate=rate, gap_s=0.0, crossfade_s=0.0,
                           subtype="PCM_16", workers=workers)

    def product(workers: int) -> float:
        out = fresh()
        t0 = time.perf_counter()
        summary = run_synthesize(SynthesizeConfig(out_dir=str(out), num_workers=workers, **base))
        wall = time.perf_counter() - t0
        assert summary.written == n and not summary.failed, summary.lines()
        return wall

    def render_now(workers: int) -> float:
        batches = [{"plan": np.asarray([pl.to_json()])} for pl in plans]
        t0 = time.perf_counter()
        got = [b for b in run_render_tasks(stage(fresh(), workers), batches, workers)]
        wall = time.perf_counter() - t0
        assert sum(len(b["audio_id"]) for b in got) == n
        spans.setdefault(("render: Ray tasks (now)", workers), []).append(in_flight([b["span"] for b in got]))
        return wall

    def render_before(workers: int) -> float:
        # The previous render stage, as run_synthesize ran it: Ray Data, one block (one task) per long audio.
        t0 = time.perf_counter()
        ds = map_stage(ray.data.from_items([{"plan": pl.to_json()} for pl in plans], override_num_blocks=n),
                       stage(fresh(), workers), 1)
        got = list(ds.iter_rows())
        wall = time.perf_counter() - t0
        assert len(got) == n
        spans.setdefault(("render: Ray Data (before)", workers), []).append(in_flight([r["span"] for r in got]))
        return wall

    def render_bare(workers: int) -> float:
        kw = {"audio_dir": str(audio), "out_dir": str(fresh()), "rate": rate, "gap_s": 0.0, "crossfade_s": 0.0,
              "subtype": "PCM_16"}
        task = ray.remote(lambda batch: render_batch(batch, **kw))
        t0 = time.perf_counter()
        pending = []
        for pl in plans:
            pending.append(task.remote({"plan": np.array([pl.to_json()])}))
            if len(pending) >= workers:
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)
        ray.get(pending)
        return time.perf_counter() - t0

    cases = {"run_synthesize, now": product, "render: Ray tasks (now)": render_now,
             "render: Ray Data (before)": render_before, "render: bare Ray tasks (reference)": render_bare}
    walls: dict[tuple[str, int], list[float]] = {}
    for rnd in range(args.repeats + 1):  # round 0 warms every path up and is not counted
        for name, fn in cases.items():
            for workers in (1, 2):
                wall = fn(workers)
                if rnd:
                    walls.setdefault((name, workers), []).append(wall)
        for d in root.glob("out_*"):
            shutil.rmtree(d)
        if rnd == 0:
            spans.clear()
    mean_dur = float(np.mean([sum(c.frames / c.sample_rate for c in pl.clips) for pl in plans]))
    ray.shutdown()
    shutil.rmtree(root)

    rate_of = {k: n / float(np.median(v)) for k, v in walls.items()}
    scaling = {name: rate_of[(name, 2)] / rate_of[(name, 1)] for name in cases}
    print(f"source: {args.clips} clips of 15-30 s at 44.1 kHz; {n} long audios of {args.clips_per_audio} clips "
          f"(mean {mean_dur:.0f} s) per run; median of {args.repeats} interleaved rounds")
    print(f"load average (1 min) at start and end: {load_start:.1f}, {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
          "cores (other work on the machine makes the audios/s figures noisy; renders in flight much less so)")
    print(f"{'':36} {'1 worker':>14} {'2 workers':>14} {'scaling':>8}")
    for name in cases:
        print(f"{name:36} {rate_of[(name, 1)]:>8.2f} aud/s {rate_of[(name, 2)]:>8.2f} aud/s {scaling[name]:>7.2f}x")
    for (name, workers), vals in sorted(spans.items()):
        if workers == 2:
            print(f"{name}, 2 workers: {np.median(vals):.2f} renders running at once on average "
                  "(2.00 = both workers always busy)")
    print(f"audio seconds per second, run_synthesize with 2 workers: {rate_of[('run_synthesize, now', 2)] * mean_dur:.0f}")
    print(f"synthesis scaling 1 -> 2 workers: run_synthesize {scaling['run_synthesize, now']:.2f}x (target >= 1.6x); "
          f"render stage now {scaling['render: Ray tasks (now)']:.2f}x, before (Ray Data) "
          f"{scaling['render: Ray Data (before)']:.2f}x, bare Ray tasks {scaling['render: bare Ray tasks (reference)']:.2f}x")


if __name__ == "__main__":
    main()
