"""run_train_captioner: inputs -> Ray Data (encoder inputs in CPU tasks) -> Ray Train (TorchTrainer)
-> <run_dir>/captioner_best/ + train_captioner_summary.json.

Like train-clap, re-running the same command resumes: Ray Train V2 restores the run with the same
storage_path (<run_dir>/ray_train) and name (train_captioner.name), and the loop's
`ray.train.get_checkpoint()` returns the latest checkpoint. A larger max_steps / epochs continues it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from larcq_ray.core.errors import LarcqError
from larcq_ray.train.captioner_data import (encoder_input_dataset, frames_dataset, read_inputs, resolve_window,
                                            text_dataset, window_dataset)
from larcq_ray.train.captioner_loop import BEST_DIR, PROGRESS_FILE, captioner_loop_per_worker
from larcq_ray.train.data import write_skipped
from larcq_ray.train.job import local_run_dir

log = logging.getLogger(__name__)

SKIPPED_FILE = "train_captioner_skipped.csv"
SUMMARY_FILE = "train_captioner_summary.json"


def _abs_if_inside(name: str | None, folder: Path) -> str | None:
    """A relative model path that names something inside the captioner folder, made absolute (the
    new captioner folder lives elsewhere)."""
    if name and not Path(name).is_absolute() and (folder / name).exists():
        return str((folder / name).resolve())
    return name


def model_config(tc) -> tuple[dict, str | None]:
    """(the captioner config as a dict, the folder training continues from or None)."""
    if tc.model is not None:
        return tc.model.model_dump(mode="json"), None
    folder = Path(tc.from_)
    if tc.kind == "prefix-lm":
        from larcq_ray.caption.prefix_lm import read_config
    else:
        from larcq_ray.caption.drcap import read_config
    if not folder.is_dir():
        raise LarcqError(f"train_captioner.from {tc.from_!r} is not a folder (a captioner written by train-captioner)")
    kind = json.loads((folder / "captioner.json").read_text()).get("kind") if (folder / "captioner.json").is_file() \
        else None
    if kind is not None and kind != tc.kind:
        raise LarcqError(f"{folder} holds a {kind!r} captioner; set train_captioner.kind: {kind}")
    cfg = read_config(folder).model_dump(mode="json")
    if tc.kind == "prefix-lm":
        cfg["encoder"]["name_or_path"] = _abs_if_inside(cfg["encoder"]["name_or_path"], folder)
    else:
        cfg["clap"]["name_or_path"] = _abs_if_inside(cfg["clap"]["name_or_path"], folder)
        cfg["clap"]["adapter"] = _abs_if_inside(cfg["clap"].get("adapter"), folder)
    cfg["decoder"]["name_or_path"] = _abs_if_inside(cfg["decoder"]["name_or_path"], folder)
    return cfg, str(folder.resolve())


def _check_decoder(name: str, local_files_only: bool) -> None:
    """Fail on the driver, before any worker starts, when the decoder cannot be found."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise LarcqError(f"could not load the caption decoder {name!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}") from None


def _encoder_window(enc: dict, window_s, local_files_only: bool) -> float:
    from larcq_ray.caption import audio_encoders as ae

    kind = ae.encoder_type(enc["name_or_path"], enc.get("type", "auto"), local_files_only)
    fe = ae.load_feature_extractor(enc["name_or_path"], kind, local_files_only)
    return resolve_window(window_s, ae.max_seconds(fe, kind), enc["name_or_path"])


def _skip_counts(rows: list[dict], csv_path: Path) -> dict:
    def n(prefix: str) -> int:
        return sum(r["reason"].startswith(prefix) for r in rows)

    counts = {"total": len(rows), "empty_caption": n("empty caption"), "no_audio": n("no audio"),
              "audio_failed": n("audio failed"), "bad_row": n("bad jsonl row") + n("empty file_name")}
    counts["csv"] = str(csv_path)
    return counts


def run_train_captioner(cfg) -> dict:
    import ray.train
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from larcq_ray.core.ray_session import ensure_ray

    tc = cfg.train_captioner
    if tc.data is None or (tc.model is None and not tc.from_):
        raise LarcqError("train-captioner needs train_captioner.data (captions_csv + audio_dir, provenance or jsonl) "
                         "and train_captioner.model (a fresh captioner) or train_captioner.from (a captioner folder)")
    t0 = time.time()
    run_dir = local_run_dir(cfg.run_dir, "train-captioner", "captioner_best/")
    run_dir.mkdir(parents=True, exist_ok=True)
    model, init_folder = model_config(tc)
    kind = tc.kind
    train, val = read_inputs(tc.data, need_audio=kind == "prefix-lm")
    lfo = tc.local_files_only
    if init_folder is None or not (Path(init_folder) / "decoder").is_dir():
        _check_decoder(model["decoder"]["name_or_path"], lfo)

    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    t_prepare = time.time()
    fpt = tc.data.files_per_task
    ds_val_audio, bad_val_audio = None, []
    if kind == "prefix-lm":
        window = _encoder_window(model["encoder"], tc.window_s, lfo)
        enc = model["encoder"]
        common = dict(encoder=enc["name_or_path"], encoder_type=enc.get("type", "auto"), window_s=window,
                      local_files_only=lfo, files_per_task=fpt)
        ds_train, bad_train = encoder_input_dataset(train.clips, source="train", **common)
        ds_val, bad_val = encoder_input_dataset(val.clips, source="val", **common) if val.clips else (None, [])
        if tc.cache_encoder_frames and not enc.get("train"):
            device = "cuda" if tc.use_gpu else "cpu"
            fr = dict(encoder=enc["name_or_path"], encoder_type=enc.get("type", "auto"), local_files_only=lfo,
                      device=device, batch_size=tc.val_batch_size)
            ds_train, bad = frames_dataset(ds_train, source="train", **fr)
            bad_train += bad
            ds_val, bad = frames_dataset(ds_val, source="val", **fr)
            bad_val += bad
        n_train = ds_train.count() if ds_train is not None else 0
    else:
        window = None
        ds_train, bad_train = text_dataset(train.clips), []
        ds_val, bad_val = (text_dataset(val.clips), []) if val.clips else (None, [])
        n_train = ds_train.count()
        with_audio = [c for c in val.clips if c.path][:tc.val_caption_items]
        if with_audio:
            from larcq_ray.models.clap import cached_featurizer

            fz = cached_featurizer(model["clap"]["name_or_path"], 0, lfo)
            window = resolve_window(tc.window_s, fz.max_samples / fz.sample_rate, model["clap"]["name_or_path"])
            ds_val_audio, bad_val_audio = window_dataset(with_audio, fz.sample_rate, window, fpt, "val")
            if ds_val_audio is not None and ds_val_audio.count() == 0:
                ds_val_audio = None
    skipped = train.skipped + val.skipped + bad_train + bad_val + bad_val_audio
    write_skipped(skipped, run_dir / SKIPPED_FILE)
    n_val = ds_val.count() if ds_val is not None else 0
    if n_train < tc.num_workers * tc.batch_size:
        unit = "clips decoded" if kind == "prefix-lm" else "captions"
        raise LarcqError(f"{n_train} training {unit}, fewer than num_workers x batch_size = {tc.num_workers} x "
                         f"{tc.batch_size}: lower train_captioner.batch_size (skipped inputs: "
                         f"{run_dir / SKIPPED_FILE})")
    if ds_val is not None and n_val == 0:
        ds_val = None
    bad_train_ids = {r["clip_id"] for r in bad_train}
    bad_val_ids = {r["clip_id"] for r in bad_val}
    n_train_pairs = sum(len(c.captions) for c in train.clips if c.clip_id not in bad_train_ids)
    n_val_pairs = sum(len(c.captions) for c in val.clips if c.clip_id not in bad_val_ids)
    data_summary = {"n_train_clips": len(train.clips) - len(bad_train_ids), "n_train_captions": n_train_pairs,
                    "n_val_clips": len(val.clips) - len(bad_val_ids), "n_val_captions": n_val_pairs,
                    "window_s": window}
    log.info("training a %s captioner on %d clips (%d captions), validating on %d; %d inputs skipped", kind,
             data_summary["n_train_clips"], n_train_pairs, data_summary["n_val_clips"], len(skipped))

    loop_cfg = {
        "kind": kind, "model": model, "init_folder": init_folder, "local_files_only": lfo, "run_dir": str(run_dir),
        "datastore": [t for c in train.clips for t in c.captions] if kind == "drcap" else None,
        "epochs": tc.epochs, "max_steps": tc.max_steps, "batch_size": tc.batch_size,
        "val_batch_size": tc.val_batch_size, "lr": tc.lr, "weight_decay": tc.weight_decay,
        "warmup_steps": tc.warmup_steps, "grad_clip": tc.grad_clip, "lr_schedule": tc.lr_schedule,
        "total_steps": min(tc.max_steps or 10**12, tc.epochs * (n_train // (tc.batch_size * tc.num_workers))),
        "checkpoint_every_steps": tc.checkpoint_every_steps, "seed": tc.data.seed, "torch_threads": tc.torch_threads,
        "has_val": ds_val is not None, "has_val_audio": ds_val_audio is not None,
        "val_caption_items": tc.val_caption_items, "val_num_beams": tc.val_num_beams,
        "val_max_new_tokens": tc.val_max_new_tokens, "metrics": list(tc.metrics), "select_best": tc.select_best,
        "debug_nan_at_step": tc.debug_nan_at_step, "shuffle_buffer": max(tc.batch_size * 4, 64),
        "data_summary": data_summary,
    }
    datasets = {"train": ds_train, **({"val": ds_val} if ds_val is not None else {}),
                **({"val_audio": ds_val_audio} if ds_val_audio is not None else {})}
    storage = run_dir / "ray_train"
    trainer = TorchTrainer(
        captioner_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker,
                                                           **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=RunConfig(name=tc.name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),  # rank 0 validates on all of val
    )
    t_fit = time.time()
    result = trainer.fit()
    fit_s = time.time() - t_fit
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    progress_path = run_dir / PROGRESS_FILE
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    latest = result.checkpoint.path if result.checkpoint is not None else None
    best_dir = run_dir / BEST_DIR
    summary = {
        "status": "nan" if progress.get("nan_at_step") else "ok",
        "kind": kind,
        "model": model,
        "from": init_folder,
        **data_summary,
        "skipped": _skip_counts(skipped, run_dir / SKIPPED_FILE),
        "resumed_from_step": progress.get("start_step", metrics.get("start_step", 0)),
        "steps": progress.get("step", metrics.get("step")),
        "epochs_completed": progress.get("epoch"),
        "val_history": progress.get("history", []),
        "best": {"by": progress.get("best_by"), "value": progress.get("best"), "epoch": progress.get("best_epoch"),
                 "step": progress.get("best_step")},
        "last_loss": metrics.get("loss"),
        "losses": progress.get("losses", []),
        "nan_at_step": progress.get("nan_at_step"),
        "paths": {"run_dir": str(run_dir), "ray_train": str(storage / tc.name), "latest_checkpoint": latest,
                  "captioner_best": str(best_dir) if (best_dir / "captioner.json").is_file() else None},
        "wall_s": round(time.time() - t0, 1),
        "prepare_s": round(t_fit - t_prepare, 1),  # reading + Ray Data (encoder inputs, cached frames)
        "fit_s": round(fit_s, 1),  # Ray Train: worker start, model loads, steps, validation, checkpoints
    }
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if summary["status"] == "nan":
        raise LarcqError(f"loss became NaN at step {progress['nan_at_step']}; last good checkpoint: {latest} "
                         f"(lower train_captioner.lr, or re-run to resume from it)")
    return summary


def run(cfg) -> dict:
    """`larcq-ray train-captioner` (needs a local run_dir: workers write captioner_best/ into it)."""
    s = run_train_captioner(cfg)
    b = s["best"]
    log.info("trained a %s captioner: %d steps (resumed from step %d) on %d captions, %d inputs skipped; best %s %s "
             "(step %s); captioner: %s (caption.backend: {kind: %s, model: <that folder>})", s["kind"],
             s["steps"] or 0, s["resumed_from_step"] or 0, s["n_train_captions"], s["skipped"]["total"], b["by"],
             b["value"], b["step"], s["paths"]["captioner_best"], s["kind"])
    return s
