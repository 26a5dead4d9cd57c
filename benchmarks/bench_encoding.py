"""Encoding throughput: 10 s chunks per second through the Ray index pipeline vs the bare model.

Full-size CLAP architecture (HTSAT-fused audio tower, default ClapConfig sizes) with random
weights, built offline. The pipeline figure is the whole index job (decode, resample, mel
features, embedding, Parquet commit) after Ray has started; the bare figure is
`get_audio_features` alone on precomputed features of the same chunks, same batch size and
thread count. It prints the end-to-end overhead (pipeline time / bare time - 1) and the
steady-state overhead: the marginal cost per chunk between runs over half and all of the files,
in which the fixed costs (actor start, model load, planning) cancel out.

    python benchmarks/bench_encoding.py [--files 8 --seconds 60 --batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def build_full_size_clap(folder: Path) -> None:
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    torch.manual_seed(0)
    cfg = ClapConfig(audio_config=dict(enable_fusion=True))  # HTSAT-fused sizes, RoBERTa-base text tower
    ClapModel(cfg).eval().save_pretrained(folder)
    ClapFeatureExtractor(truncation="fusion").save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each file (multiple of 10)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sample-rate", type=int, default=44100, help="source rate (resampled to 48 kHz)")
    args = ap.parse_args()

    import ray
    import torch

    from larcq_ray.models.clap import AudioFeaturizer, ClapAudioEncoder
    from larcq_ray.config import PipelineConfig
    from larcq_ray.index.job import run_index
    from larcq_ray.core.ray_session import ensure_ray

    work = Path(tempfile.mkdtemp(prefix="bench_enc_"))
    try:
        model = work / "model"
        t = time.perf_counter()
        build_full_size_clap(model)
        print(f"built full-size CLAP (random weights) in {time.perf_counter() - t:.1f} s")
        corpus = work / "corpus"
        corpus.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.files):
            x = (0.1 * rng.standard_normal(int(args.seconds * args.sample_rate))).astype(np.float32)
            sf.write(corpus / f"f{i:03d}.flac", x, args.sample_rate)
        n_chunks = args.files * int(np.ceil(args.seconds / 10.0))
        threads = os.cpu_count() or 1

        # Bare forward: features precomputed outside the timed region.
        from larcq_ray.core.audio import decode_audio

        fz = AudioFeaturizer(str(model))
        feats = []
        t = time.perf_counter()
        for p in sorted(corpus.iterdir()):
            x = decode_audio(p, fz.sample_rate).samples
            for s in range(0, len(x), fz.max_samples):
                feats.append(fz(x[s:s + fz.max_samples]))
        prep = time.perf_counter() - t
        torch.set_num_threads(threads)
        enc = ClapAudioEncoder(str(model), device="cpu")
        warm = feats[: args.batch_size]  # warm-up at the timed batch shape
        enc(np.stack([f.input_features for f in warm]), np.array([f.is_longer for f in warm]))
        t = time.perf_counter()
        for i in range(0, len(feats), args.batch_size):
            b = feats[i:i + args.batch_size]
            enc(np.stack([f.input_features for f in b]), np.array([f.is_longer for f in b]))
        bare = time.perf_counter() - t

        ensure_ray()

        def pipeline(files: list[Path], tag: str) -> float:
            cfg = PipelineConfig.model_validate({
                "run_dir": str(work / f"run_{tag}"),
                "data": {"corpus": str(corpus)},
                "model": {"name_or_path": str(model), "device": "cpu"},
                "index": {"whole_file": False, "batch_size": args.batch_size, "files_per_decode_task": 1,
                          "chunking": {"mode": "fixed", "window_s": 10.0}},
            })
            from larcq_ray.core.inputs import AudioRef

            refs = [AudioRef(p.name, str(p)) for p in files]
            t = time.perf_counter()
            summary = run_index(cfg, refs, show_progress=False)
            assert summary.done == len(files) and summary.failed == 0, summary.lines()
            return time.perf_counter() - t

        files = sorted(corpus.iterdir())
        pipeline(files[:1], "warmup")  # worker processes and imports warm, as in the runs compared
        half = files[: len(files) // 2]
        t_half = pipeline(half, "half")
        t_full = pipeline(files, "full")
        per_chunk = n_chunks // len(files)
        marginal = (t_full - t_half) / ((len(files) - len(half)) * per_chunk)

        print(f"chunks: {n_chunks} x 10 s, batch {args.batch_size}, torch threads {threads}, cores {os.cpu_count()}")
        print(f"decode+resample+mel alone (serial): {prep:.2f} s = {1000 * prep / n_chunks:.1f} ms/chunk")
        print(f"bare forward:           {bare:.2f} s = {n_chunks / bare:.3f} chunks/s ({1000 * bare / n_chunks:.1f} ms/chunk)")
        print(f"Ray pipeline, end to end ({n_chunks} chunks, incl. actor start + model load): {t_full:.2f} s = "
              f"{n_chunks / t_full:.3f} chunks/s -> {100 * (t_full / bare - 1):.1f}% over bare")
        print(f"Ray pipeline, steady state (marginal cost of the second half, fixed costs cancel): "
              f"{1000 * marginal:.1f} ms/chunk = {1 / marginal:.3f} chunks/s -> "
              f"{100 * (marginal / (bare / n_chunks) - 1):.1f}% over bare (target <= 15%)")
        print(f"fixed cost per index run (actor start, model load, Ray Data planning): "
              f"{t_half - marginal * len(half) * per_chunk:.1f} s")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
