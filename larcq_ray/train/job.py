"""run_train_clap: pairs -> Ray Data features -> Ray Train (TorchTrainer) -> model_best/ + train_summary.json.

Ray Train V2 (the default in Ray 2.60) resumes by itself: a run with the same storage_path
(<run_dir>/ray_train) and name (train.name) restores its checkpoint manager snapshot, and the loop's
`ray.train.get_checkpoint()` returns the latest checkpoint. So re-running the same command after a
crash, or with a larger max_steps / epochs, continues from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from larcq_ray.core.errors import LarcqError
from larcq_ray.train.data import PairSet, feature_dataset, read_clotho_csv, read_provenance, split_by_group, write_skipped
from larcq_ray.train.loop import PROGRESS_FILE, train_loop_per_worker

log = logging.getLogger(__name__)


def local_run_dir(run_dir: str, command: str = "train-clap", writes: str = "model_best/") -> Path:
    """Training run_dirs must be local or shared: every worker writes into them."""
    if "://" in run_dir and not run_dir.startswith("file://"):
        raise LarcqError(f"{command} needs a local or shared-filesystem run_dir (all workers write {writes} "
                         f"there), not {run_dir!r}; train locally and copy the folder")
    return Path(run_dir.removeprefix("file://")).resolve()


def read_pairs(tc) -> tuple[PairSet, PairSet]:
    d = tc.data
    if d.captions_csv:
        train = read_clotho_csv(d.captions_csv, d.audio_dir, "train")
    else:
        train = read_provenance(d.provenance, d.audios_dir, "train")
    if d.val_csv:
        val = read_clotho_csv(d.val_csv, d.val_audio_dir or d.audio_dir, "val")
    else:
        tr, va = split_by_group(train.clips, d.val_fraction, d.seed)
        val = PairSet(va, [])
        train = PairSet(tr, train.skipped)
    if not train.clips:
        raise LarcqError("no training pairs: every row lacked a caption (see the inputs)")
    return train, val


def base_model(tc, run_dir: Path, captions: list[str]) -> str:
    """init.from as given, or a fresh model built once into <run_dir>/init_model (reused on resume)."""
    if tc.init.from_:
        from larcq_ray.models.clap import load_clap_config

        load_clap_config(tc.init.from_, tc.init.local_files_only)  # fail here, not in every worker
        return tc.init.from_
    out = run_dir / "init_model"
    if not (out / "config.json").is_file():
        from larcq_ray.models.fresh_clap import build_fresh_clap

        s = tc.init.config
        build_fresh_clap(out, captions, fusion=s.fusion, seed=tc.init.seed, vocab_size=s.vocab_size, dim=s.dim,
                         max_text_tokens=s.max_text_tokens, text_layers=s.text_layers, text_heads=s.text_heads,
                         audio_depths=s.audio_depths, audio_heads=s.audio_heads,
                         patch_embeds_hidden_size=s.patch_embeds_hidden_size, audio_patch_size=s.audio_patch_size,
                         audio_window_size=s.audio_window_size, text_from=s.text_from,
                         built_by="larcq_ray.train (init.config)")
    return str(out)


def run_train_clap(cfg) -> dict:
    import ray.train
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from larcq_ray.core.ray_session import ensure_ray

    tc = cfg.train
    if tc.data is None or tc.init is None:
        raise LarcqError("train-clap needs train.data (captions_csv + audio_dir, or provenance) and train.init "
                         "(from: a model, or config: sizes of a fresh one) in the config")
    t0 = time.time()
    run_dir = local_run_dir(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train, val = read_pairs(tc)
    base = base_model(tc, run_dir, [t for c in train.clips for t in c.captions])

    if tc.freeze or tc.param_lr:  # a wrong prefix fails here with its message, not in every Ray Train worker
        from larcq_ray.train.loop import build_model, freeze_parameters, param_groups

        model = build_model(base, tc.lora.model_dump() if tc.lora.enabled else None, tc.init.local_files_only)
        freeze_parameters(model, list(tc.freeze))
        param_groups(model, tc.lr, dict(tc.param_lr))
        del model
    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    common = dict(fusion_seed=cfg.model.fusion_seed, local_files_only=tc.init.local_files_only,
                  files_per_task=tc.data.files_per_task)
    ds_train, bad_train = feature_dataset(train.clips, base, source="train", **common)
    ds_val, bad_val = feature_dataset(val.clips, base, source="val", **common) if val.clips else (None, [])
    skipped = train.skipped + val.skipped + bad_train + bad_val
    write_skipped(skipped, run_dir / "train_skipped.csv")
    n_train = ds_train.count() if ds_train is not None else 0
    n_val = ds_val.count() if ds_val is not None else 0
    if n_train < tc.num_workers * tc.batch_size:
        raise LarcqError(f"{n_train} training clips decoded, fewer than num_workers x batch_size = "
                         f"{tc.num_workers} x {tc.batch_size}: lower train.batch_size (skipped inputs: "
                         f"{run_dir / 'train_skipped.csv'})")
    if ds_val is not None and n_val == 0:
        ds_val = None
    bad_ids = {r["clip_id"] for r in bad_train}
    n_pairs = sum(len(c.captions) for c in train.clips if c.clip_id not in bad_ids)
    log.info("training on %d clips (%d pairs), validating on %d clips; %d inputs skipped", n_train, n_pairs, n_val,
             len(skipped))

    loop_cfg = {
        "base": base, "local_files_only": tc.init.local_files_only, "run_dir": str(run_dir),
        "lora": tc.lora.model_dump(), "epochs": tc.epochs, "max_steps": tc.max_steps, "batch_size": tc.batch_size,
        "val_batch_size": tc.val_batch_size, "lr": tc.lr, "weight_decay": tc.weight_decay, "grad_clip": tc.grad_clip,
        "checkpoint_every_steps": tc.checkpoint_every_steps, "seed": tc.data.seed, "torch_threads": tc.torch_threads,
        "has_val": ds_val is not None, "debug_nan_at_step": tc.debug_nan_at_step,
        "freeze": list(tc.freeze), "multi_positive": tc.multi_positive, "param_lr": dict(tc.param_lr),
        "shuffle_buffer": max(tc.batch_size * 4, 64),
    }
    datasets = {"train": ds_train, **({"val": ds_val} if ds_val is not None else {})}
    storage = run_dir / "ray_train"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker,
                                                           **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=RunConfig(name=tc.name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),  # rank 0 validates on all of val
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    progress_path = run_dir / PROGRESS_FILE
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    latest = result.checkpoint.path if result.checkpoint is not None else None
    summary = {
        "status": "nan" if progress.get("nan_at_step") else "ok",
        "base_model": base,
        "lora": tc.lora.enabled,
        "n_train_clips": n_train,
        "n_train_pairs": n_pairs,
        "n_val_clips": n_val,
        "n_val_pairs": sum(len(c.captions) for c in val.clips if c.clip_id not in {r["clip_id"] for r in bad_val}),
        "skipped": {"total": len(skipped),
                    "empty_caption": sum(r["reason"] == "empty caption" for r in skipped),
                    "audio_failed": len(bad_train) + len(bad_val),
                    "other": sum(r["reason"] == "empty file_name" for r in skipped),
                    "csv": str(run_dir / "train_skipped.csv")},
        "resumed_from_step": progress.get("start_step", metrics.get("start_step", 0)),
        "steps": progress.get("step", metrics.get("step")),
        "epochs_completed": progress.get("epoch"),
        "val_history": progress.get("history", []),
        "best_epoch": progress.get("best_epoch"),
        "best_val_R@1": progress.get("best_R@1"),
        "last_loss": metrics.get("loss"),
        "nan_at_step": progress.get("nan_at_step"),
        "paths": {"run_dir": str(run_dir), "ray_train": str(storage / tc.name), "latest_checkpoint": latest,
                  "model_best": str(run_dir / "model_best") if (run_dir / "model_best").is_dir() else None,
                  "adapter_best": str(run_dir / "adapter_best") if (run_dir / "adapter_best").is_dir() else None},
        "wall_s": round(time.time() - t0, 1),
    }
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if summary["status"] == "nan":
        raise LarcqError(f"loss became NaN at step {progress['nan_at_step']}; last good checkpoint: {latest} "
                         f"(lower train.lr, or re-run to resume from it)")
    return summary


def run(cfg) -> dict:
    """`larcq-ray train-clap` (needs a local run_dir: workers write model_best/ into it)."""
    s = run_train_clap(cfg)
    log.info("trained %s%s: %d steps (resumed from step %d) on %d pairs, %d inputs skipped; best val R@1 %s "
             "(epoch %s); model: %s", s["base_model"], " (LoRA)" if s["lora"] else "", s["steps"] or 0,
             s["resumed_from_step"] or 0, s["n_train_pairs"], s["skipped"]["total"], s["best_val_R@1"],
             s["best_epoch"], s["paths"]["model_best"])
    return s
