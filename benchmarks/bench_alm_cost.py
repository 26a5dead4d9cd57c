"""What each captioner backend costs on CPU, by seed 004's protocol (larcq_ray/evaluate/alm_cost.py):
batch 1, warm-up runs, then timed runs; TTFT (the prefill, to the first token), TPOT (one cached
decode step), peak memory (peak RSS of the measuring process on CPU).

    HF_HUB_OFFLINE=1 python benchmarks/bench_alm_cost.py [--window-s 2] [--warmup 3] [--runs 10]
        [--threads 1] [--long-prompt-words 0]

Every model is built offline in a temporary folder: the tiny random Qwen2-Audio (hf-audio-lm);
prefix-lm captioners of the tiny Qwen2 over a tiny Whisper and the tiny CLAP; a drcap captioner over
the tiny CLAP; and the trained demo captioner (the demo CLAP's audio tower -> a small Qwen2). Each
backend is measured in its own fresh Python process, so its peak RSS is its own (model loading
included), not the benchmark's. --long-prompt-words N adds rows prefilled with an N-word prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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


def _waves(n: int, seconds: float, sr: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    return [(0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.02 * rng.standard_normal(len(t)))
            .astype(np.float32) for _ in range(n)]


def measure_one(args) -> None:
    """Child process: build the backend, measure, print one JSON line."""
    import torch

    from larcq_ray.caption.backends import build_caption_backend
    from larcq_ray.caption.config import CaptionBackendConfig
    from larcq_ray.core.ray_session import quiet_weight_loading
    from larcq_ray.evaluate.alm_cost import measure_cost

    torch.set_num_threads(args.threads)
    quiet_weight_loading()
    cfg = CaptionBackendConfig(**json.loads(args.one))
    backend = build_caption_backend(cfg)
    prompt = None
    if args.long_prompt_words:
        prompt = " ".join(["describe"] * args.long_prompt_words)
    waves = _waves(2, min(args.window_s, backend.window_s), backend.sample_rate)
    r = measure_cost(backend, cfg.kind, waves, prompt=prompt, warmup_runs=args.warmup, timed_runs=args.runs)
    print(json.dumps(r))


def _prefix_lm_folder(root: Path, name: str, encoder: Path, lm: Path) -> Path:
    from larcq_ray.caption.connectors import ConnectorSpec
    from larcq_ray.caption.prefix_decoder import DecoderSpec
    from larcq_ray.caption.prefix_lm import EncoderSpec, PrefixLm, PrefixLmConfig

    cfg = PrefixLmConfig(encoder=EncoderSpec(name_or_path=str(encoder)), connector=ConnectorSpec(type="linear", k=5),
                         decoder=DecoderSpec(name_or_path=str(lm), train="lora"))
    return PrefixLm(cfg, trainable=True, local_files_only=True).save(root / name)


def _drcap_folder(root: Path, clap: Path, lm: Path) -> Path:
    from larcq_ray.caption.drcap import DrCap, DrcapConfig
    from larcq_ray.caption.prefix_decoder import DecoderSpec

    cfg = DrcapConfig(clap={"name_or_path": str(clap)}, decoder=DecoderSpec(name_or_path=str(lm), train="lora"))
    return DrCap(cfg, captions=CAPTIONS * 3, trainable=True, local_files_only=True).save(root / "drcap")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window-s", type=float, default=2.0, help="seconds of audio per measured input")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each measuring process")
    p.add_argument("--long-prompt-words", type=int, default=0, help="also measure with an N-word prompt (0: no)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: a child measuring one backend
    args = p.parse_args()
    if args.one:
        measure_one(args)
        return

    from larcq_ray.core.ray_session import quiet_weight_loading
    from larcq_ray.offline.demo_captioner import assemble_demo_captioner
    from larcq_ray.offline.demo_clap import assemble_demo_clap
    from larcq_ray.offline.tiny_alm import build_tiny_qwen2_audio
    from larcq_ray.offline.tiny_audio_encoders import build_tiny_whisper_encoder
    from larcq_ray.offline.tiny_clap import build_tiny_clap
    from larcq_ray.offline.tiny_lm import build_tiny_causal_lm

    quiet_weight_loading()
    ws = int(args.window_s) if float(args.window_s).is_integer() else 2
    common = dict(local_files_only=True, device="cpu", window_s=float(args.window_s))
    with tempfile.TemporaryDirectory(prefix="bench_alm_cost_") as tmp:
        root = Path(tmp)
        print(f"building models in {root} ...", file=sys.stderr)
        alm = build_tiny_qwen2_audio(root / "alm", CAPTIONS * 20, chunk_length_s=max(ws, 2))
        lm = build_tiny_causal_lm(root / "lm", CAPTIONS * 20 + [PROMPT] * 5)
        clap = build_tiny_clap(root / "clap", CAPTIONS * 20, fusion=False, seed=0)
        whisper = build_tiny_whisper_encoder(root / "whisper", chunk_length_s=max(ws, 2))
        demo = assemble_demo_captioner(root / "demo_captioner", assemble_demo_clap(root / "demo_clap"))
        backends = [
            ("hf-audio-lm: tiny Qwen2-Audio", dict(kind="hf-audio-lm", model=str(alm))),
            ("prefix-lm: tiny Whisper -> linear -> tiny Qwen2", dict(kind="prefix-lm", model=str(
                _prefix_lm_folder(root, "plm_whisper", whisper, lm)))),
            ("prefix-lm: tiny CLAP -> linear -> tiny Qwen2", dict(kind="prefix-lm", model=str(
                _prefix_lm_folder(root, "plm_clap", clap, lm)))),
            ("prefix-lm: demo captioner (trained)", dict(kind="prefix-lm", model=str(demo))),
            ("drcap: tiny CLAP -> tiny Qwen2", dict(kind="drcap", model=str(_drcap_folder(root, clap, lm)))),
        ]
        prompts = [0] + ([args.long_prompt_words] if args.long_prompt_words else [])
        rows = []
        for name, b in backends:
            for words in prompts:
                cmd = [sys.executable, __file__, "--one", json.dumps({**common, **b}), "--window-s", str(args.window_s),
                       "--warmup", str(args.warmup), "--runs", str(args.runs), "--threads", str(args.threads),
                       "--long-prompt-words", str(words)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    print(f"{name}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}",
                          file=sys.stderr)
                    continue
                label = name + (f" [{words}-word prompt]" if words else "")
                rows.append((label, json.loads(r.stdout.strip().splitlines()[-1])))
    print(f"\nseed-004 cost protocol on CPU: batch 1, {args.warmup} warm-up + {args.runs} timed runs, "
          f"{args.window_s:g} s inputs, {args.threads} torch thread(s); medians; peak memory = peak RSS of a fresh "
          "process (model loading included)")
    head = f"{'backend':<62} {'prefill tok':>11} {'TTFT ms':>9} {'TPOT ms':>9} {'peak MiB':>9}"
    print(head)
    print("-" * len(head))
    for name, r in rows:
        print(f"{name:<62} {r['prefill_tokens_mean']:>11.0f} {r['ttft_ms_median']:>9.2f} {r['tpot_ms_median']:>9.2f} "
              f"{r['peak_memory_mb']:>9.0f}")


if __name__ == "__main__":
    main()
