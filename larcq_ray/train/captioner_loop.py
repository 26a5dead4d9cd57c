"""`captioner_loop_per_worker` for Ray Train's TorchTrainer (`larcq-ray train-captioner`), and its
checkpoint format.

Checkpoint folder (no pickles): `trainable.safetensors` (the trainable state only: the connector /
projector, the decoder's LoRA weights or the whole decoder, the encoder when it trains) with
`trainable.json` (its keys), `optimizer.safetensors` + `optimizer.json` (AdamW, as train/loop.py
saves it), `train_state.json` (step, epoch, batches done in that epoch, validation history, best).
The best model is written as a captioner folder (`PrefixLm.save` / `DrCap.save`) to
<run_dir>/captioner_best, what `caption.backend: {kind: prefix-lm|drcap, model: ...}` loads.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from larcq_ray.train.captioner_data import FEATURE_PREFIX

STATE_FILE = "train_state.json"
TRAINABLE_FILE = "trainable.safetensors"
TRAINABLE_KEYS = "trainable.json"
PROGRESS_FILE = "train_captioner_progress.json"  # rank 0 mirrors the state into run_dir for the driver
BEST_DIR = "captioner_best"


# ---------------------------------------------------------------- the model

def build_captioner(c: dict, device: str):
    """A trainable PrefixLm / DrCap: fresh from c["model"], or continued from c["init_folder"]."""
    if c["kind"] == "prefix-lm":
        from larcq_ray.caption.prefix_lm import PrefixLm, PrefixLmConfig

        return PrefixLm(PrefixLmConfig.model_validate(c["model"]), folder=c.get("init_folder"), device=device,
                        trainable=True, local_files_only=c["local_files_only"])
    from larcq_ray.caption.drcap import DrCap, DrcapConfig

    # The datastore (support + retrieval store) is the training captions, also when continuing.
    return DrCap(DrcapConfig.model_validate(c["model"]), captions=list(c["datastore"]), folder=c.get("init_folder"),
                 device=device, trainable=True, local_files_only=c["local_files_only"])


def trainable_keys(lm, kind: str) -> list[str]:
    """State-dict keys of `lm.module` that training changes (what a checkpoint holds)."""
    cfg = lm.cfg
    whole = ["connector."] if kind == "prefix-lm" else ["projector."]
    if kind == "prefix-lm" and cfg.encoder.train:
        whole.append("encoder.")
    if cfg.decoder.train == "full":
        whole.append("decoder.")
    lora = cfg.decoder.train == "lora"
    return [k for k in lm.module.state_dict()
            if any(k.startswith(p) for p in whole) or (lora and k.startswith("decoder.") and "lora_" in k)]


def save_trainable(lm, kind: str, d: Path) -> None:
    from safetensors.torch import save_file

    sd = lm.module.state_dict()
    keys = trainable_keys(lm, kind)
    # copies: tied weights (shared storage) would make save_file refuse the dict
    save_file({k: sd[k].detach().to("cpu", copy=True).contiguous() for k in keys}, str(d / TRAINABLE_FILE))
    (d / TRAINABLE_KEYS).write_text(json.dumps({"kind": kind, "keys": keys}))


def load_trainable(lm, kind: str, d: Path) -> None:
    from safetensors.torch import load_file

    from larcq_ray.core.errors import LarcqError

    tensors = load_file(str(d / TRAINABLE_FILE))
    want = set(trainable_keys(lm, kind))
    if set(tensors) != want:
        extra, missing = sorted(set(tensors) - want)[:3], sorted(want - set(tensors))[:3]
        raise LarcqError(f"checkpoint {d} does not fit this captioner (keys it has and the model lacks: {extra}; "
                         f"keys the model trains and it lacks: {missing}); a changed train_captioner.model needs "
                         "a new train_captioner.name or run_dir")
    result = lm.module.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def _loss_module(lm, kind: str):
    """One nn.Module whose forward is the training loss, so DDP (which syncs gradients only for
    forwards through its wrapper) sees every call. Its parameters are `lm.module`'s."""
    from torch import nn

    class CaptionerLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = lm.module

        def forward(self, inputs, targets, seed=None):
            if kind == "prefix-lm":
                return lm.loss(inputs, targets)
            return lm.loss_from_text(targets, seed)

    return CaptionerLoss()


def _n_target_tokens(tokenizer, targets: list[str]) -> int:
    """How many tokens the decoder loss averages over (each target + eos, as build_inputs makes them)."""
    eos = 1 if tokenizer.eos_token_id is not None else 0
    return sum(len(tokenizer(" " + t.strip(), add_special_tokens=False)["input_ids"]) + eos for t in targets)


def _inputs(batch: dict) -> dict:
    return {k[len(FEATURE_PREFIX):]: np.asarray(v) for k, v in batch.items() if k.startswith(FEATURE_PREFIX)}


# ---------------------------------------------------------------- validation

def validate_prefix_lm(lm, val_batches, c: dict, *, generate: bool) -> tuple[dict, dict, dict]:
    """(figures, predictions, references): the token-level loss over every (clip, caption) pair, and
    captions generated for the first c["val_caption_items"] clips."""
    import torch

    from larcq_ray.caption.prefix_decoder import decoder_loss

    total, tokens, pairs = 0.0, 0, 0
    preds: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    vbs = c["val_batch_size"]
    with torch.no_grad():
        for b in val_batches:
            inputs = _inputs(b)
            caps = [json.loads(x) for x in b["captions"]]
            prefix = lm.prefix(inputs)
            idx = [i for i, cs in enumerate(caps) for _ in cs]
            targets = [t for cs in caps for t in cs]
            for s in range(0, len(targets), vbs):
                part, tgt = idx[s:s + vbs], targets[s:s + vbs]
                loss = decoder_loss(lm.module.decoder, lm.tokenizer, prefix[part], lm.cfg.prompt, tgt)
                n = _n_target_tokens(lm.tokenizer, tgt)
                total += float(loss) * n
                tokens += n
                pairs += len(tgt)
            need = c["val_caption_items"] - len(preds) if generate else 0
            if need > 0:
                sub = {k: v[:need] for k, v in inputs.items()}
                texts = lm.generate(sub, num_beams=c["val_num_beams"], max_new_tokens=c["val_max_new_tokens"])
                for cid, t, cs in zip(b["clip_id"][:need], texts, caps[:need]):
                    preds[str(cid)], refs[str(cid)] = t, cs
    return {"val_loss": total / tokens if tokens else None, "val_pairs": pairs}, preds, refs


def validate_drcap(lm, val_batches, audio_batches, c: dict, *, generate: bool) -> tuple[dict, dict, dict]:
    """drcap: the loss on the validation captions (text stands in for audio, as in training; seeded
    retrieval), and captions generated from the audio of the first validation clips that have audio."""
    import torch

    total, tokens, pairs = 0.0, 0, 0
    vbs = c["val_batch_size"]
    with torch.no_grad():
        for n_batch, b in enumerate(val_batches):
            caps = [str(x) for x in b["caption"]]
            for s in range(0, len(caps), vbs):
                tgt = caps[s:s + vbs]
                loss = lm.loss_from_text(tgt, c["seed"] + 7919 * n_batch + s)
                n = _n_target_tokens(lm.tokenizer, tgt)
                total += float(loss) * n
                tokens += n
                pairs += len(tgt)
    preds: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    if generate:
        for b in audio_batches:
            need = c["val_caption_items"] - len(preds)
            if need <= 0:
                break
            waves = [np.frombuffer(x, dtype=np.float32) for x in b["samples"][:need]]
            texts = lm.generate_from_audio(waves, num_beams=c["val_num_beams"], max_new_tokens=c["val_max_new_tokens"])
            for cid, t, cs in zip(b["clip_id"][:need], texts, b["captions"][:need]):
                preds[str(cid)], refs[str(cid)] = t, json.loads(cs)
    return {"val_loss": total / tokens if tokens else None, "val_pairs": pairs}, preds, refs


def _is_better(metric: str, value, best) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value < best if metric == "val_loss" else value > best


# ---------------------------------------------------------------- the loop

def lr_at(c: dict, step: int) -> float:
    """The learning rate of (1-based) `step`: linear warm-up, then constant or cosine decay to 0."""
    warm = c.get("warmup_steps") or 0
    if warm and step <= warm:
        return c["lr"] * step / warm
    if c.get("lr_schedule") == "cosine":
        total = max(c.get("total_steps") or 1, warm + 1)
        progress = min(1.0, (step - warm) / (total - warm))
        return c["lr"] * 0.5 * (1.0 + math.cos(math.pi * progress))
    return c["lr"]


def captioner_loop_per_worker(c: dict) -> None:
    import torch

    import ray.train
    import ray.train.torch

    from larcq_ray.core.ray_session import quiet_weight_loading
    from larcq_ray.train.loop import _all_finite, load_optimizer, pick_captions, save_optimizer

    quiet_weight_loading()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if c.get("torch_threads"):
        torch.set_num_threads(int(c["torch_threads"]))
    torch.manual_seed(c["seed"])  # the same fresh connector / LoRA on every worker
    kind = c["kind"]
    device = ray.train.torch.get_device()
    lm = build_captioner(c, str(device))

    state = {"step": 0, "epoch": 0, "epoch_step": 0, "best": None, "best_epoch": None, "best_step": None,
             "best_by": c["select_best"], "history": [], "losses": []}
    ckpt = ray.train.get_checkpoint()
    ckpt_dir = None
    if ckpt is not None:
        ckpt_dir = Path(tempfile.mkdtemp(prefix="larcq_capt_resume_"))
        with ckpt.as_directory() as d:
            shutil.copytree(d, ckpt_dir, dirs_exist_ok=True)
        load_trainable(lm, kind, ckpt_dir)
        state.update(json.loads((ckpt_dir / STATE_FILE).read_text()))
    start_step = state["step"]

    wrapper = _loss_module(lm, kind)
    ddp = ray.train.torch.prepare_model(wrapper, parallel_strategy_kwargs={"find_unused_parameters": True})
    params = [p for p in lm.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c["lr"], weight_decay=c["weight_decay"])
    if ckpt_dir is not None:
        load_optimizer(opt, ckpt_dir)
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    run_dir = Path(c["run_dir"])
    max_steps = c["max_steps"] or math.inf
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if c["has_val"] else None
    audio_shard = ray.train.get_dataset_shard("val_audio") if c.get("has_val_audio") else None
    last_ckpt_step = start_step if ckpt is not None else None
    recent: list[float] = []

    def write_progress(**extra) -> None:  # what the driver reads back (Result.metrics only has checkpointed reports)
        if rank == 0:
            (run_dir / PROGRESS_FILE).write_text(json.dumps({**state, "start_step": start_step, **extra}))

    def base_metrics() -> dict:
        return {"step": state["step"], "epoch": state["epoch"], "start_step": start_step,
                "loss": float(np.mean(recent)) if recent else None, "nan_at_step": None}

    def save_and_report(extra: dict) -> None:
        nonlocal last_ckpt_step
        metrics = {**base_metrics(), **extra}
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="larcq_capt_ckpt_") as tmp:
                d = Path(tmp)
                save_trainable(lm, kind, d)
                save_optimizer(opt, d)
                (d / STATE_FILE).write_text(json.dumps(state))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            write_progress()
        else:
            ray.train.report(metrics)
        last_ckpt_step = state["step"]

    def export_best(figures: dict) -> None:
        extra = {"built_by": "larcq_ray.train (train-captioner)", "kind": kind, "from": c.get("init_folder"),
                 "epoch": state["epoch"], "step": state["step"], "selected_by": state["best_by"],
                 "data": c["data_summary"], **figures}
        out = run_dir / BEST_DIR
        tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".captioner_tmp"))
        lm.save(tmp, extra)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)

    def validate(*, at_start: bool = False) -> dict:
        """Rank 0: validation figures (+ captioner_best/ when they are the best so far)."""
        if rank != 0:
            return {}
        if val_shard is None:
            if not at_start:  # no validation data: captioner_best is the latest model
                state["best_by"] = "last (no validation data)"
                state["best_epoch"], state["best_step"] = state["epoch"], state["step"]
                export_best({})
            return {}
        t0 = time.time()
        lm.set_train(False)
        generate = not at_start and c["val_caption_items"] > 0
        batches = val_shard.iter_batches(batch_size=c["val_batch_size"], batch_format="numpy")
        if kind == "prefix-lm":
            figures, preds, refs = validate_prefix_lm(lm, batches, c, generate=generate)
        else:
            audio = audio_shard.iter_batches(batch_size=c["val_batch_size"], batch_format="numpy") \
                if audio_shard is not None else []
            figures, preds, refs = validate_drcap(lm, batches, audio, c, generate=generate)
        if preds:
            from larcq_ray.evaluate.caption_metrics import caption_metrics

            m = caption_metrics(preds, refs, c["metrics"])
            figures.update({"val_" + k: v for k, v in m["scores"].items()})
            figures["val_metrics_items"] = m["n_items"]
            figures["val_metrics_not_run"] = m["not_run"]
            figures["val_tokenizer"] = m["tokenizer"]
            figures["val_examples"] = [{"clip_id": k, "generated": preds[k], "reference": refs[k][0]}
                                       for k in list(preds)[:3]]
        figures["val_s"] = round(time.time() - t0, 2)
        lm.set_train(True)
        state["history"].append({"epoch": state["epoch"], "step": state["step"], **figures})
        if not at_start:
            by = c["select_best"]
            value = figures.get("val_" + by if by != "val_loss" else "val_loss")
            if value is None and by != "val_loss":  # the metric could not run: fall back to the loss
                by, value = "val_loss", figures.get("val_loss")
            if state["best_by"] != by:  # a different yardstick: start the comparison afresh
                state["best_by"], state["best"] = by, None
            if _is_better(by, value, state["best"]):
                state["best"], state["best_epoch"], state["best_step"] = value, state["epoch"], state["step"]
                export_best({k: v for k, v in figures.items() if k != "val_examples"})
        return figures

    lm.set_train(True)
    write_progress()
    if ckpt is None and c["has_val"]:
        validate(at_start=True)  # the step-0 loss, the yardstick for the training that follows
        write_progress()

    stopped = False
    while state["epoch"] < c["epochs"] and state["step"] < max_steps and not stopped:
        skip = state["epoch_step"]
        it = train_shard.iter_batches(batch_size=c["batch_size"], batch_format="numpy", drop_last=True,
                                      local_shuffle_buffer_size=c.get("shuffle_buffer") or None,
                                      local_shuffle_seed=c["seed"] + state["epoch"])
        seen = 0
        t0 = time.time()
        for batch in it:
            seen += 1
            if seen <= skip:  # batches this epoch already trained on before the resume
                continue
            step_seed = c["seed"] * 1_000_003 + state["step"] * 101 + rank
            if kind == "prefix-lm":
                loss = ddp(_inputs(batch), pick_captions(batch, c["seed"], state["epoch"]))
            else:
                loss = ddp(None, [str(x) for x in batch["caption"]], step_seed)
            if c.get("debug_nan_at_step") == state["step"] + 1:
                loss = loss * float("nan")
            opt.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(loss).item())
            if finite:
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, c["grad_clip"] or float("inf"))
                finite = bool(torch.isfinite(norm).item())
            if not _all_finite(finite, device):
                write_progress(nan_at_step=state["step"] + 1, last_good_step=last_ckpt_step)
                ray.train.report({**base_metrics(), "nan_at_step": state["step"] + 1,
                                  "last_good_step": last_ckpt_step})
                return  # no step taken, nothing saved: the last checkpoint stays the last good one
            for g in opt.param_groups:
                g["lr"] = lr_at(c, state["step"] + 1)
            opt.step()
            state["step"] += 1
            state["epoch_step"] = seen
            recent.append(float(loss.item()))
            state["losses"].append([state["step"], round(float(loss.item()), 5)])
            if state["step"] % c["checkpoint_every_steps"] == 0:
                save_and_report({"step_time_s": (time.time() - t0) / max(1, seen - skip)})
                recent = []
            if state["step"] >= max_steps:
                stopped = True
                break
        if not stopped:  # a full epoch
            state["epoch"] += 1
            state["epoch_step"] = 0
            val = validate()
            save_and_report({k: v for k, v in val.items() if isinstance(v, (int, float))} | {"epoch_end": True})
            recent = []
    if stopped:  # max_steps reached mid-epoch: validate what we have and keep it
        val = validate()
        save_and_report({k: v for k, v in val.items() if isinstance(v, (int, float))} | {"epoch_end": False})
    elif state["step"] == start_step and ckpt is not None:
        ray.train.report({**base_metrics(), "nothing_to_do": True})
