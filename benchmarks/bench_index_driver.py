"""The index job's driver memory against corpus size: it must not grow with the corpus.

Writes N short WAVs (0.5 s, 16 kHz, distinct tones) per size, then runs the real index job
(decode tasks -> tiny offline CLAP actor -> writer tasks -> manifest) in a fresh process per size,
on a local Ray, and reads that driver process's RSS: after Ray started and the model loaded
(`start`), and its peak (ru_maxrss) at the end. The embeddings go from the writer tasks to the
store; the driver only sees one status row per file and batch.

    .venv/bin/python benchmarks/bench_index_driver.py                    # 1k and 10k files
    .venv/bin/python benchmarks/bench_index_driver.py --files 1000 10000 100000

Last line: `index_driver: files=N1/N2/... peak_mib=P1/P2/... growth_mib_per_10k=G`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_corpus(folder: Path, n: int, sr: int = 16000) -> None:
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(0.5 * sr)) / sr
    for i in range(n):
        sub = folder / f"{i // 1000:04d}"
        sub.mkdir(exist_ok=True)
        sf.write(sub / f"f{i:06d}.wav", (0.3 * np.sin(2 * np.pi * (200 + i % 3000) * t)).astype(np.float32), sr)


def child(corpus: str, model: str, run_dir: str) -> None:
    from larcq_ray.config import PipelineConfig
    from larcq_ray.core.ray_session import ensure_ray
    from larcq_ray.index.job import run_index

    cfg = PipelineConfig.model_validate({
        "run_dir": run_dir, "data": {"corpus": corpus},
        "model": {"name_or_path": model, "device": "cpu", "local_files_only": True},
        "index": {"batch_size": 64, "files_per_decode_task": 64, "commit_every_files": 256, "whole_file": False,
                  "chunking": {"mode": "fixed", "window_s": 10.0, "min_chunk_s": 0.1}},
        "ray": {"num_cpus": 2},
    })
    ensure_ray(None, 2)
    start = _rss_mib()
    rows = [0]
    first = [None]

    def seen(batch):
        rows[0] += len(batch["audio_id"])
        if first[0] is None:
            first[0] = time.time() - t0

    t0 = time.time()
    s = run_index(cfg, show_progress=False, seen=seen)
    print(json.dumps({"done": s.done, "failed": s.failed, "seconds": time.time() - t0, "start_mib": start,
                      "end_mib": _rss_mib(), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "driver_rows": rows[0], "first_status_s": first[0]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--child", nargs=3, metavar=("CORPUS", "MODEL", "RUN_DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    from larcq_ray.offline.tiny_clap import build_tiny_clap

    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_clap(tmp / "clap", ["a tone", "noise hisses", "a low hum"] * 20, fusion=False, seed=0)
        print(f"{'files':>7} {'done':>7} {'failed':>6} {'seconds':>8} {'files/s':>8} {'start MiB':>10} "
              f"{'peak MiB':>9} {'rows to driver':>15} {'first status s':>15}")
        for n in a.files:
            corpus = tmp / f"c{n}"
            write_corpus(corpus, n)
            p = subprocess.run([sys.executable, __file__, "--child", str(corpus), str(model), str(tmp / f"r{n}")],
                               capture_output=True, text=True)
            if p.returncode:
                print(f"{n:>7} failed: {p.stderr.strip().splitlines()[-3:]}")
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            peaks.append((n, r["peak_mib"]))
            print(f"{n:>7} {r['done']:>7} {r['failed']:>6} {r['seconds']:>8.1f} {n / r['seconds']:>8.1f} "
                  f"{r['start_mib']:>10.0f} {r['peak_mib']:>9.0f} {r['driver_rows']:>15} "
                  f"{r['first_status_s']:>15.1f}", flush=True)
    if len(peaks) >= 2:
        (n0, p0), (n1, p1) = peaks[0], peaks[-1]
        growth = (p1 - p0) / (n1 - n0) * 10000
    else:
        growth = float("nan")
    print(f"index_driver: files={'/'.join(str(n) for n, _ in peaks)} "
          f"peak_mib={'/'.join(f'{p:.0f}' for _, p in peaks)} growth_mib_per_10k={growth:.1f}")


if __name__ == "__main__":
    main()
