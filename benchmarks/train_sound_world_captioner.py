"""Train the demo captioner on the sound world with `larcq-ray train-captioner`, measure how often
its captions name the right event, and (with --export) write the committed copy.

    python benchmarks/train_sound_world_captioner.py [--out /tmp/larcq_sw_captioner] [--clips 3000]
        [--epochs 30] [--seed 0] [--export larcq_ray/offline/demo_captioner_weights]

1. assembles the demo CLAP (the encoder: its audio tower, frozen) and writes `--clips` one-event clips
   (2-5 s, 48 kHz, `sound_world.write_clip_dataset`, seed `--seed`) whose five captions are drawn
   from the TRAINING phrasings with every synonym combination, plus 200 validation clips (seed+1);
2. builds a small Qwen2 decoder (BPE on the training phrasings, 2 layers of 128, random init) that
   trains whole, with a linear connector (k=2 -> 256 -> the decoder's width);
3. writes config.yaml and runs `larcq-ray train-captioner --config config.yaml` (a local Ray, 1
   worker; the frozen encoder's frames are computed once, then 30 epochs of batch 32, AdamW 2e-3,
   cosine decay; captioner_best = the lowest validation loss);
4. measures `demo_captioner.kind_accuracy` on 2 clips of every (kind, attributes) combination rendered
   with seed 999 (never used in training) and prints it as JSON;
5. --export copies captioner_best (connector, decoder, tokenizer; the encoder is referenced, not
   copied) to the given folder, with the figures in its provenance.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/larcq_sw_captioner")
    ap.add_argument("--clips", type=int, default=3000)
    ap.add_argument("--val-clips", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--export", default=None, help="copy the trained captioner here (the committed folder)")
    args = ap.parse_args()

    import yaml

    from larcq_ray.offline import demo_captioner, sound_world
    from larcq_ray.offline.demo_clap import assemble_demo_clap
    from larcq_ray.offline.tiny_lm import build_tiny_causal_lm

    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    clap = out / "model"
    if not (clap / "config.json").is_file():
        assemble_demo_clap(clap)
    data, val = out / "clips_train", out / "clips_val"
    if not (data / "captions.csv").is_file():
        sound_world.write_clip_dataset(data, args.clips, seed=args.seed, duration_s=demo_captioner.CLIP_SECONDS,
                                       split="train", synonyms="all")
    if not (val / "captions.csv").is_file():
        sound_world.write_clip_dataset(val, args.val_clips, seed=args.seed + 1,
                                       duration_s=demo_captioner.CLIP_SECONDS, split="train", synonyms="all")
    lm = out / "decoder_init"
    if not (lm / "config.json").is_file():
        build_tiny_causal_lm(lm, demo_captioner.training_phrasings() * 3, seed=args.seed, vocab_size=400,
                             hidden_size=128, num_layers=2)
    cfg = {
        "run_dir": str(out / "run"),
        "train_captioner": {
            "name": "sound_world_captioner",
            "kind": "prefix-lm",
            "model": {"encoder": {"name_or_path": str(clap), "train": False},
                      "connector": {"type": "linear", "k": 2, "hidden": 256},
                      "decoder": {"name_or_path": str(lm), "train": "full"},
                      "prompt": "Describe the sound:"},
            "data": {"captions_csv": str(data / "captions.csv"), "audio_dir": str(data / "audio"),
                     "val_csv": str(val / "captions.csv"), "val_audio_dir": str(val / "audio"),
                     "seed": args.seed},
            "epochs": args.epochs, "batch_size": 32, "lr": args.lr, "weight_decay": 0.01,
            "lr_schedule": "cosine", "warmup_steps": 50, "checkpoint_every_steps": 500,
            "val_caption_items": 32, "val_max_new_tokens": 32, "metrics": ["bleu", "rouge_l", "cider_d"],
            "select_best": "val_loss", "num_workers": 1, "cpus_per_worker": 1, "local_files_only": True,
        },
        "ray": {"num_cpus": 2},
    }
    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [str(Path(sys.executable).with_name("larcq-ray")), "train-captioner", "--config", str(cfg_path)]
    print("running:", shlex.join(cmd), flush=True)
    t_train = time.time()
    subprocess.run(cmd, check=True)
    train_s = time.time() - t_train
    best = out / "run" / "captioner_best"
    summary = json.loads((out / "run" / "train_captioner_summary.json").read_text())

    figures = demo_captioner.kind_accuracy(best, seed=999, per_combo=2)
    result = {"command": "python benchmarks/train_sound_world_captioner.py " + shlex.join(sys.argv[1:]),
              "clips": args.clips, "epochs": args.epochs, "steps": summary["steps"], "best": summary["best"],
              "train_s": round(train_s, 1), "wall_s": round(time.time() - t0, 1), "eval": figures}
    print(json.dumps(result, indent=2))
    if args.export:
        dest = Path(args.export)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(best, dest)
        c = json.loads((dest / "captioner.json").read_text())
        c["encoder"]["name_or_path"] = demo_captioner.ENCODER_PLACEHOLDER
        c["decoder"]["name_or_path"] = "decoder"  # the whole decoder ships in the folder
        (dest / "captioner.json").write_text(json.dumps(c, indent=2))
        (dest / "provenance.json").write_text(json.dumps({k: v for k, v in result.items()}, indent=2))
        size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        print(f"exported to {dest} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
