"""Synthesis throughput: long audios per second with 1 and 2 Ray workers, and the scaling ratio.

    python benchmarks/bench_synthesis.py [--clips 60] [--audios 40] [--clips-per-audio 5]

The source is Clotho-like: `--clips` mono 44.1 kHz WAV clips of 15-30 s (synthesized events)
and a captions CSV. Each run writes `--audios` long audios of `--clips-per-audio` clips
(75-150 s, as in Clotho_LARCQ) into a fresh folder. The worker count is the render stage's task
concurrency (TaskPoolStrategy). The Ray session declares 4 logical CPUs on this 2-core machine:
Ray Data keeps part of a cluster's CPUs in reserve for its other operators, so with 2 declared
CPUs it never runs two 1-CPU render tasks at once. A warm-up run comes first.
Figures: wall time of the whole `run_synthesize` (scan + plan + render + tables), and as a
reference the same renders as plain Ray tasks (1 or 2 in flight, no Ray Data).
"""

from __future__ import annotations

import argparse
import csv
import logging
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
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from larcq_ray.core.ray_session import _quiet_ray_data
    from larcq_ray.synthesize.job import run_synthesize
    from larcq_ray.synthesize.config import SynthesizeConfig

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    _quiet_ray_data()
    root = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    csv_path, audio = make_source(root, args.clips)

    def run(workers: int, out: Path, n: int) -> tuple[float, float]:
        cfg = SynthesizeConfig(captions_csv=str(csv_path), audio_dir=str(audio), out_dir=str(out), n_audios=n,
                               clips_per_audio=args.clips_per_audio, seed=1, num_workers=workers,
                               commit_every=8)
        t0 = time.perf_counter()
        summary = run_synthesize(cfg)
        wall = time.perf_counter() - t0
        assert summary.written == n and not summary.failed, summary.lines()
        durations = [sf.info(str(f)).duration for f in (out / "audios").iterdir()]
        return wall, float(np.mean(durations))

    def run_plain(in_flight: int, out: Path, n: int) -> float:
        from larcq_ray.synthesize.plan import plan_benchmark
        from larcq_ray.synthesize.render import render_batch
        from larcq_ray.synthesize.source import scan_source

        cfg = SynthesizeConfig(captions_csv=str(csv_path), audio_dir=str(audio), out_dir=str(out), n_audios=n,
                               clips_per_audio=args.clips_per_audio, seed=1)
        plans = plan_benchmark(scan_source(cfg)[0], cfg)
        kw = {"audio_dir": str(audio), "out_dir": str(out), "rate": 44100, "gap_s": 0.0, "crossfade_s": 0.0,
              "subtype": "PCM_16"}
        task = ray.remote(lambda batch: render_batch(batch, **kw))
        t0 = time.perf_counter()
        pending = []
        for p in plans:
            pending.append(task.remote({"plan": np.array([p.to_json()])}))
            if len(pending) >= in_flight:
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)
        ray.get(pending)
        return time.perf_counter() - t0

    run(2, root / "warmup", 4)
    rows, plain = [], []
    for workers in (1, 2):
        wall, mean_dur = run(workers, root / f"out_{workers}", args.audios)
        rows.append((workers, wall, args.audios / wall, mean_dur))
        shutil.rmtree(root / f"out_{workers}")
    for in_flight in (1, 2):
        plain.append(args.audios / run_plain(in_flight, root / f"plain_{in_flight}", args.audios))
        shutil.rmtree(root / f"plain_{in_flight}")
    ray.shutdown()
    shutil.rmtree(root)

    print(f"source: {args.clips} clips of 15-30 s at 44.1 kHz; {args.audios} long audios of "
          f"{args.clips_per_audio} clips (mean {rows[0][3]:.0f} s) per run")
    print(f"{'workers':>7} {'wall s':>8} {'audios/s':>9} {'audio-s/s':>10}")
    for workers, wall, rate, mean_dur in rows:
        print(f"{workers:>7} {wall:>8.2f} {rate:>9.2f} {rate * mean_dur:>10.0f}")
    print(f"scaling 1 -> 2 workers: {rows[1][2] / rows[0][2]:.2f}x")
    print(f"reference, plain Ray tasks: {plain[0]:.2f} audios/s with 1 in flight, {plain[1]:.2f} with 2: "
          f"{plain[1] / plain[0]:.2f}x")


if __name__ == "__main__":
    main()
