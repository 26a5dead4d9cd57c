"""Caption throughput per backend on CPU: seconds of audio captioned per second of wall time.

    HF_HUB_OFFLINE=1 python benchmarks/bench_caption_throughput.py [--windows 16] [--window-s 2]
        [--batch-size 4] [--max-new-tokens 16] [--beam-sizes 2,3,4,5,6,7,8] [--threads 1] [--repeats 3]

Every model is tiny and random, built offline in a temporary folder (their cost is what counts
here, not their captions): the tiny Qwen2-Audio (hf-audio-lm); prefix-lm captioners of the tiny
Qwen2 with a linear or Q-Former connector over a tiny Whisper, CLAP or AST encoder; a drcap
captioner over the tiny CLAP when larcq_ray/caption/drcap.py is there. The backends are called
directly (no Ray): one warm-up batch, then `caption()` on all windows, timed at least --repeats times
and for at least 3 s (the fastest run counts: on a shared machine others' load only adds time). Untrained decoders
stop at their first end-of-text token or at --max-new-tokens, so the table shows the captions' mean
length in characters beside the throughput. Last, CLAP-Refine's overhead: the same captioner with one
decode per beam size in --beam-sizes and the CLAP pick, against greedy decoding.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CAPTIONS = [
    "a dog barks loudly", "rain falls on a tin roof", "a car passes by on a wet street",
    "a high tone rings", "a low hum drones", "birds chirp in the morning", "a door creaks open",
    "white noise hisses", "a bell rings twice", "footsteps on gravel",
]
PROMPT = "USER: Describe the audio you hear.\n ASSISTANT:"


def _windows(n: int, seconds: float, sr: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return [(0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.02 * rng.standard_normal(len(t)))
            .astype(np.float32) for _ in range(n)]


def _prefix_lm_folder(root: Path, name: str, encoder: Path, lm: Path, connector: dict) -> Path:
    from larcq_ray.caption.connectors import ConnectorSpec
    from larcq_ray.caption.prefix_decoder import DecoderSpec
    from larcq_ray.caption.prefix_lm import EncoderSpec, PrefixLm, PrefixLmConfig

    cfg = PrefixLmConfig(encoder=EncoderSpec(name_or_path=str(encoder)), connector=ConnectorSpec(**connector),
                         decoder=DecoderSpec(name_or_path=str(lm), train="lora"))
    return PrefixLm(cfg, trainable=True, local_files_only=True).save(root / name)


def _drcap_folder(root: Path, clap: Path, lm: Path) -> Path:
    from larcq_ray.caption.drcap import DrCap, DrcapConfig
    from larcq_ray.caption.prefix_decoder import DecoderSpec

    cfg = DrcapConfig(clap={"name_or_path": str(clap)}, decoder=DecoderSpec(name_or_path=str(lm), train="lora"))
    return DrCap(cfg, captions=CAPTIONS * 3, trainable=True, local_files_only=True).save(root / "drcap")


def measure(label: str, cfg, n: int, window_s: float, repeats: int = 1) -> dict:
    from larcq_ray.caption.backends import build_caption_backend

    t0 = time.perf_counter()
    backend = build_caption_backend(cfg)
    load_s = time.perf_counter() - t0
    waves = _windows(n, min(window_s, backend.window_s), backend.sample_rate)
    backend.caption(waves[: cfg.batch_size])  # warm-up: first-call costs
    # The fastest of at least `repeats` runs, and of as many as fit in 3 s: other processes' load
    # only ever adds time, and short runs need many tries to find a quiet moment.
    wall, spent, runs = float("inf"), 0.0, 0
    while runs < repeats or (spent < 3.0 and runs < 50):
        t0 = time.perf_counter()
        captions = backend.caption(waves)
        took = time.perf_counter() - t0
        wall, spent, runs = min(wall, took), spent + took, runs + 1
    audio_s = sum(len(w) for w in waves) / backend.sample_rate
    return {"backend": label, "load_s": load_s, "windows": n, "audio_s": audio_s, "wall_s": wall,
            "x_realtime": audio_s / wall, "chars": float(np.mean([len(c) for c in captions]))}


def _table(rows: list[dict]) -> str:
    head = f"{'backend':<40} {'load s':>7} {'windows':>7} {'audio s':>8} {'wall s':>7} {'audio s / s':>11} {'chars':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['backend']:<40} {r['load_s']:>7.2f} {r['windows']:>7d} {r['audio_s']:>8.1f} "
                     f"{r['wall_s']:>7.2f} {r['x_realtime']:>11.1f} {r['chars']:>6.1f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16, help="windows captioned per backend")
    p.add_argument("--window-s", type=int, default=2, help="seconds per window (the tiny encoders' input)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--beam-sizes", default="2,3,4,5,6,7,8", help="CLAP-Refine's beam sizes (SLAM-AAC: 2..8)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (tiny models gain nothing from more; on a busy machine more threads wait on each other)")
    p.add_argument("--repeats", type=int, default=3, help="at least this many timed runs per backend; the fastest counts")
    args = p.parse_args()

    import torch

    from larcq_ray.caption.config import CaptionBackendConfig
    from larcq_ray.core.ray_session import quiet_weight_loading
    from larcq_ray.offline.tiny_alm import build_tiny_qwen2_audio
    from larcq_ray.offline.tiny_audio_encoders import build_tiny_ast, build_tiny_whisper_encoder
    from larcq_ray.offline.tiny_clap import build_tiny_clap
    from larcq_ray.offline.tiny_lm import build_tiny_causal_lm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quiet_weight_loading()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ws = args.window_s
    beams = [int(b) for b in args.beam_sizes.split(",")]
    common = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, local_files_only=True,
                  device="cpu", window_s=float(ws))
    with tempfile.TemporaryDirectory(prefix="bench_caption_") as tmp:
        root = Path(tmp)
        print(f"building tiny models in {root} ...", file=sys.stderr)
        alm = build_tiny_qwen2_audio(root / "alm", CAPTIONS * 20, chunk_length_s=ws)
        lm = build_tiny_causal_lm(root / "lm", CAPTIONS * 20 + [PROMPT] * 5)
        clap = build_tiny_clap(root / "clap", CAPTIONS * 20, fusion=False, seed=0)
        whisper = build_tiny_whisper_encoder(root / "whisper", chunk_length_s=ws)
        ast = build_tiny_ast(root / "ast", max_length=100 * ws)
        linear = dict(type="linear", k=5)
        qformer = dict(type="qformer", window=17, queries=1, qformer_hidden=32, qformer_layers=1, qformer_heads=2)
        plm = {"whisper/linear": _prefix_lm_folder(root, "plm_whisper_linear", whisper, lm, linear),
               "whisper/qformer": _prefix_lm_folder(root, "plm_whisper_qformer", whisper, lm, qformer),
               "clap/linear": _prefix_lm_folder(root, "plm_clap_linear", clap, lm, linear),
               "ast/linear": _prefix_lm_folder(root, "plm_ast_linear", ast, lm, linear)}

        rows = [measure("hf-audio-lm (tiny Qwen2-Audio)", CaptionBackendConfig(model=str(alm), **common),
                        args.windows, ws, args.repeats)]
        for name, folder in plm.items():
            rows.append(measure(f"prefix-lm {name}", CaptionBackendConfig(kind="prefix-lm", model=str(folder),
                                                                          **common), args.windows, ws, args.repeats))
        drcap = None
        if Path(__file__).resolve().parents[1].joinpath("larcq_ray", "caption", "drcap.py").is_file():
            drcap = _drcap_folder(root, clap, lm)
            rows.append(measure("drcap (tiny CLAP)", CaptionBackendConfig(kind="drcap", model=str(drcap), **common),
                                args.windows, ws, args.repeats))
        else:
            print("drcap: skipped (larcq_ray/caption/drcap.py is not in this tree)")
        print(f"\n{args.windows} windows of {ws} s, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, "
              f"greedy, {args.threads} torch threads, fastest of >= {args.repeats} runs\n")
        print(_table(rows))

        refine = {"model": str(clap), "beam_sizes": beams}
        pairs = [("prefix-lm whisper/linear", "prefix-lm", plm["whisper/linear"])]
        if drcap is not None:
            pairs.append(("drcap", "drcap", drcap))
        print(f"\nCLAP-Refine overhead (beam sizes {beams}: {sum(beams)} beams per window in all, + the CLAP pick)\n")
        ref_rows = []
        for label, kind, folder in pairs:
            plain = measure(f"{label} greedy", CaptionBackendConfig(kind=kind, model=str(folder), **common),
                            args.windows, ws, args.repeats)
            try:
                refined = measure(f"{label} + CLAP-Refine", CaptionBackendConfig(kind=kind, model=str(folder),
                                                                                 clap_refine=refine, **common),
                                  args.windows, ws, args.repeats)
            except Exception as e:  # noqa: BLE001 - a backend without CLAP-Refine yet
                print(f"{label}: CLAP-Refine skipped ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                continue
            ref_rows += [plain, refined]
            print(f"{label}: CLAP-Refine costs x{refined['wall_s'] / plain['wall_s']:.1f} the wall time of greedy")
        if ref_rows:
            print()
            print(_table(ref_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
