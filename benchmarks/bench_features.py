"""Where CLAP's mel features are computed: cost per 10-s chunk, bytes shipped, pipeline chunks/s.

Measures, on this machine's CPU, one thread (a decode task's share of a node), CPU time (process_time):
  - decode + resample (soundfile + soxr HQ) of a 10-s 44.1 kHz FLAC chunk, common to every mode;
  - transformers' ClapFeatureExtractor (numpy, one clip at a time: `index.features: cpu-numpy`);
  - batched torch features, float64 STFT (larcq_ray.models.clap_features: `cpu-torch`);
  - what a decode task still does per chunk with `device` (pad/crop, bytes; the STFT moves to the actor);
then the CPU ms per chunk per core, the bytes each mode ships per chunk, and the chunks/s a node of
16 cores would feed; the embedding agreement of each mode with the transformers path (a tiny fused
ClapModel, random weights: tones, noise, silence, < 10 s, exactly 10 s, a long fused clip); and the
index pipeline's chunks/s (local Ray, tiny model, so features dominate) with cpu-numpy and cpu-torch.

    .venv/bin/python benchmarks/bench_features.py [--files 16 --seconds 30 --skip-pipeline]

Last line: `features: max_abs_diff=X speedup=Y` (X = 1 - the lowest embedding cosine over the
shipped formats, Y = numpy ms / batched torch ms per chunk).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # one core, as a decode task
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

SR = 48000
NODE_CORES = 16


def cpu_ms(fn, repeat: int = 3, per: int = 1) -> float:
    """Best-of-`repeat` CPU time (process_time: robust to other load on a shared machine) per item."""
    fn()  # warm (allocations, caches)
    ts = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return min(ts) * 1e3 / per


def tone(s, f=440.0, amp=0.3, sr=SR):
    t = np.arange(int(s * sr)) / sr
    return (amp * np.sin(2 * np.pi * f * t)).astype(np.float32)


def noise(s, seed=0, amp=0.1, sr=SR):
    return (np.random.default_rng(seed).standard_normal(int(s * sr)) * amp).astype(np.float32)


def test_clips() -> dict:
    return {"tone": tone(10), "noise": noise(10), "silence": np.zeros(10 * SR, np.float32), "short": tone(3.3, 1000),
            "quiet": noise(10, 3, 1e-4), "quiet_tone": tone(10, 440, 1e-3), "long_fused": noise(25.0, 1)}


def costs(model: str, batch: int) -> dict:
    import soundfile as sf
    import torch

    from larcq_ray.core.audio import decode_audio
    from larcq_ray.models.clap import AudioFeaturizer
    from larcq_ray.models.clap_features import ClapFeatureSpec, TorchClapFeatures, plan_clip

    torch.set_num_threads(1)
    fz = AudioFeaturizer(model)
    tf = TorchClapFeatures(ClapFeatureSpec.from_extractor(fz.extractor, fz.fusion), "cpu")
    chunks = [noise(10.0, seed=i) + tone(10.0, 200 + 50 * i) for i in range(batch)]
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.flac"
        sf.write(p, noise(10.0, 1, sr=44100) + tone(10.0, 330, sr=44100), 44100)
        decode = cpu_ms(lambda: decode_audio(p, SR), repeat=5)
    res = {"numpy": [], "torch": [], "f16": []}
    for _ in range(3):  # interleaved, so a burst of load on the machine hits both alike
        res["numpy"].append(cpu_ms(lambda: [fz(c) for c in chunks[:4]], repeat=1, per=4))
        res["torch"].append(cpu_ms(lambda: tf.compact(chunks), repeat=1, per=batch))
        res["f16"].append(cpu_ms(lambda: [p.numpy().astype(np.float16).tobytes() for p in tf.compact(chunks)[0]],
                                 repeat=1, per=batch))
    numpy_ms, torch_ms = min(res["numpy"]), min(res["torch"])
    f16 = min(res["f16"]) - torch_ms
    one_ms = cpu_ms(lambda: tf.compact(chunks[:1]))
    device_cpu = cpu_ms(lambda: [np.asarray(plan_clip(c, tf.spec, 0).wave, np.float32).tobytes() for c in chunks],
                        per=batch)
    return {"decode": decode, "numpy": numpy_ms, "torch": torch_ms, "torch_b1": one_ms, "device": device_cpu,
            "f16": max(f16, 0.0)}


def agreement(model: str) -> dict:
    from larcq_ray.models.clap import AudioFeaturizer, ClapAudioEncoder
    from larcq_ray.models.clap_features import ClapFeatureSpec, TorchClapFeatures

    fz = AudioFeaturizer(model)
    enc = ClapAudioEncoder(model, device="cpu")
    tf = TorchClapFeatures(ClapFeatureSpec.from_extractor(fz.extractor, fz.fusion), "cpu")
    cs = test_clips()
    refs = [fz(c) for c in cs.values()]
    ref_e = enc(np.stack([r.input_features for r in refs]), np.array([r.is_longer for r in refs]))
    feats, longer = tf(list(cs.values()))
    mel_diff = float(np.abs(feats.numpy() - np.stack([r.input_features for r in refs])).max())
    out = {"mel_max_abs_db": mel_diff}
    variants = {
        "cpu-torch f32 mel": feats,
        "cpu-torch f16 mel": feats.half().float(),
        "device (f32 samples)": feats,  # the actor runs the same TorchClapFeatures on the shipped samples
    }
    for name, f in variants.items():
        out[name] = float((enc(f.numpy(), longer) * ref_e).sum(1).min())
    for name, cast in {"f16 samples": lambda c: c.astype(np.float16),
                       "int16 samples": lambda c: np.round(np.clip(c, -1, 1) * 32767) / 32767}.items():
        f, lg = tf([cast(c) for c in cs.values()])
        out[f"(rejected) {name}"] = float((enc(f.numpy(), lg) * ref_e).sum(1).min())
    return out


def pipeline(model: str, files: int, seconds: float) -> dict:
    import soundfile as sf

    from larcq_ray.config import PipelineConfig
    from larcq_ray.core.ray_session import ensure_ray
    from larcq_ray.index.job import run_index

    ensure_ray(None, 2)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for i in range(files):
            sf.write(corpus / f"f{i:03d}.flac", noise(seconds, i, 0.05, 44100) + tone(seconds, 200 + 37 * i, sr=44100),
                     44100)
        n_chunks = files * int(np.ceil(seconds / 10.0))
        for mode in ("cpu-numpy", "cpu-torch", "device"):
            cfg = PipelineConfig.model_validate({
                "run_dir": str(Path(tmp) / mode), "data": {"corpus": str(corpus)},
                "model": {"name_or_path": model, "device": "cpu"},
                "index": {"batch_size": 16, "files_per_decode_task": 1, "features": mode, "num_gpus_per_actor": 0,
                          "whole_file": False, "chunking": {"mode": "fixed", "window_s": 10.0}},
            })
            t = time.perf_counter()
            s = run_index(cfg, show_progress=False)
            wall = time.perf_counter() - t
            assert s.done == files and s.failed == 0, s.lines()
            out[mode] = n_chunks / wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--batch", type=int, default=16, help="chunks per batched torch call")
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args()

    from larcq_ray.offline.tiny_clap import build_tiny_clap

    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_clap(Path(tmp) / "clap", ["a tone", "noise hisses", "a low hum"] * 20, fusion=True,
                                    seed=0))
        c = costs(model, args.batch)
        mel = 1001 * 64
        modes = {  # CPU ms per chunk in a decode task, bytes shipped per 10-s chunk
            "cpu-numpy": (c["decode"] + c["numpy"], mel * 4),
            "cpu-torch (f32 mel)": (c["decode"] + c["torch"], mel * 4),
            "cpu-torch (f16 mel)": (c["decode"] + c["torch"] + c["f16"], mel * 2),
            "device (f32 samples)": (c["decode"] + c["device"], SR * 10 * 4),
        }
        print(f"per 10-s chunk, one core: decode+resample {c['decode']:.1f} ms; features: numpy extractor "
              f"{c['numpy']:.1f} ms, torch batched x{args.batch} {c['torch']:.1f} ms (batch of 1: "
              f"{c['torch_b1']:.1f} ms); device mode's CPU share {c['device']:.2f} ms")
        print(f"{'index.features':24s} {'CPU ms/chunk':>12s} {'bytes/chunk':>12s} {'chunks/s, 16 cores':>19s}")
        for name, (ms, nbytes) in modes.items():
            print(f"{name:24s} {ms:12.1f} {nbytes:12,d} {NODE_CORES * 1000 / ms:19,.0f}")
        agree = agreement(model)
        print(f"log-mel max |torch - transformers| = {agree.pop('mel_max_abs_db'):.2e} dB")
        for name, cos in agree.items():
            print(f"lowest embedding cosine vs transformers, {name}: {cos:.7f}")
        if not args.skip_pipeline:
            cps = pipeline(model, args.files, args.seconds)
            print(f"index pipeline (local Ray, 2 CPUs, tiny model, {args.files} x {args.seconds:.0f} s FLAC 44.1 kHz): "
                  + ", ".join(f"{m} {v:.1f} chunks/s" for m, v in cps.items()))
        shipped = [v for k, v in agree.items() if not k.startswith("(rejected)")]
        print(f"features: max_abs_diff={1 - min(shipped):.2e} speedup={c['numpy'] / c['torch']:.1f}")


if __name__ == "__main__":
    main()
