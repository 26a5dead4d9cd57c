"""Peak memory of the index job's decode stage on long files: streamed (window by window) vs whole-file.

Generates a 48 kHz FLAC of each length (noise + tones, written block by block so this script stays
small), then runs DecodeChunkStage.process_batch on it in a fresh subprocess per (file, path) and reads
that process's peak RSS (ru_maxrss). The featurizer is the tiny offline CLAP (same mel features as a
real one). "whole" is the pre-streaming path (stream_over_s = inf), skipped above --whole-max-min.

    .venv/bin/python benchmarks/bench_index_memory.py                 # 10 min and 3 h
    .venv/bin/python benchmarks/bench_index_memory.py --minutes 10 60
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


def write_flac(path: Path, seconds: float, sr: int = 48000, block_s: float = 10.0) -> None:
    import soundfile as sf

    rng = np.random.default_rng(0)
    n, step = int(seconds * sr), int(block_s * sr)
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=1, format="FLAC", subtype="PCM_16") as f:
        for s in range(0, n, step):
            t = np.arange(s, min(n, s + step)) / sr
            freq = 220.0 * (1 + (s // step) % 8)
            f.write((0.05 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32))


def child(path: str, model: str, mode: str) -> None:
    from larcq_ray.index.stages import DecodeChunkStage

    stage = DecodeChunkStage(model=model, fusion_seed=0, local_files_only=True,
                             chunking={"mode": "fixed", "window_s": 10.0, "overlap_s": 0.0, "min_chunk_s": 1.0},
                             whole_file=True, silence_threshold_db=-80.0, memory_mb=512,
                             stream_over_s=float("inf") if mode == "whole" else 120.0)
    stage.setup()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.time()
    out = stage.process_batch({"audio_id": np.array(["a"]), "path": np.array([path])})
    rows, failed = 0, 0
    for b in ([out] if isinstance(out, dict) else out):  # batches are dropped as Ray Data would ship them on
        rows += len(b["audio_id"])
        failed += int((b["status"] != "ok").sum())
    print(json.dumps({"rows": rows, "failed": failed, "seconds": time.time() - t0, "base_mb": base,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, nargs="+", default=[10, 180])
    ap.add_argument("--whole-max-min", type=float, default=10, help="run the whole-file path up to this length")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "MODEL", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    from larcq_ray.offline.tiny_clap import build_tiny_clap

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_clap(tmp / "clap", ["a tone", "noise hisses", "a low hum"] * 20, fusion=True, seed=0)
        print(f"{'length':>8} {'path':>7} {'rows':>5} {'peak RSS MB':>12} {'(base MB)':>10} {'seconds':>8}  flac MB")
        for minutes in a.minutes:
            path = tmp / f"{minutes:g}min.flac"
            write_flac(path, minutes * 60)
            for mode in ("stream", "whole"):
                if mode == "whole" and minutes > a.whole_max_min:
                    continue
                p = subprocess.run([sys.executable, __file__, "--child", str(path), str(model), mode],
                                   capture_output=True, text=True)
                if p.returncode:
                    print(f"{minutes:>6g} m {mode:>7} failed: {p.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                print(f"{minutes:>6g} m {mode:>7} {r['rows']:>5} {r['peak_mb']:>12.0f} {r['base_mb']:>10.0f}"
                      f" {r['seconds']:>8.1f}  {path.stat().st_size / 2**20:.0f}", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
