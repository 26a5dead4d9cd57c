"""`train_loop_per_worker` for Ray Train's TorchTrainer, and the checkpoint format.

Checkpoint folder (no pickles): `model.safetensors` (full) or `adapter/` (peft save_pretrained,
LoRA), `optimizer.safetensors` + `optimizer.json` (AdamW tensors / the rest of its state_dict),
`train_state.json` (step, epoch, batches done in that epoch, val history, best).
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

STATE_FILE = "train_state.json"
PROGRESS_FILE = "train_progress.json"  # rank 0 mirrors the state into run_dir for the driver


# ---------------------------------------------------------------- model + checkpoint helpers

def build_model(base: str, lora: dict | None, local_files_only: bool = False):
    """The base ClapModel in train mode; with `lora`, wrapped by peft (only adapter weights train)."""
    from larcq_ray.models.clap import load_clap_model

    model = load_clap_model(base, device="cpu", local_files_only=local_files_only)
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                         target_modules=list(lora["target_modules"]), bias="none")
        try:
            model = get_peft_model(model, cfg)
        except ValueError as e:
            from larcq_ray.core.errors import LarcqError

            raise LarcqError(f"train.lora.target_modules {lora['target_modules']} match no module of the model: "
                             f"{str(e).splitlines()[0][:200]}") from None
    return set_train_mode(model, True)


def freeze_parameters(model, prefixes: list[str]) -> int:
    """requires_grad=False on parameters whose name (peft's wrapper prefix stripped) starts with one
    of `prefixes`; returns how many tensors were frozen. A prefix that matches nothing is an error."""
    if not prefixes:
        return 0
    hit = {p: 0 for p in prefixes}
    for name, param in model.named_parameters():
        bare = name.removeprefix("base_model.model.")
        for p in prefixes:
            if bare.startswith(p):
                param.requires_grad_(False)
                hit[p] += 1
    unused = [p for p, n in hit.items() if n == 0]
    if unused:
        from larcq_ray.core.errors import LarcqError

        raise LarcqError(f"train.freeze prefix(es) {unused} match no parameter of the model "
                         "(names look like 'text_model.encoder.layer.0...', 'audio_model...')")
    return sum(hit.values())


def param_groups(model, lr: float, param_lr: dict[str, float]) -> list[dict]:
    """AdamW groups: trainable parameters by the longest matching `param_lr` prefix (peft's wrapper
    prefix stripped); one group for the rest at `lr`. Group order is fixed, so checkpoints reload."""
    by_prefix: dict[str, list] = {p: [] for p in sorted(param_lr)}
    rest = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bare = name.removeprefix("base_model.model.")
        hits = [p for p in param_lr if bare.startswith(p)]
        (by_prefix[max(hits, key=len)] if hits else rest).append(param)
    empty = [p for p, ps in by_prefix.items() if not ps]
    if empty:
        from larcq_ray.core.errors import LarcqError

        raise LarcqError(f"train.param_lr prefix(es) {empty} match no trainable parameter")
    return [{"params": rest, "lr": lr}] + [{"params": ps, "lr": float(param_lr[p])} for p, ps in by_prefix.items()]


def set_train_mode(model, training: bool):
    """train()/eval(); a LoRA model keeps its BatchNorm layers (HTS-AT's mel norm) in eval mode: their
    running statistics are buffers outside the adapter, so updating them would change the base."""
    import torch

    model.train(training)
    if training and getattr(model, "peft_config", None):
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


def save_optimizer(opt, d: Path) -> None:
    import torch
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors, state = {}, {}
    for pid, st in sd["state"].items():
        state[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v.detach().cpu().contiguous()
                state[str(pid)][k] = {"__tensor__": f"{pid}/{k}"}
            else:
                state[str(pid)][k] = v
    save_file(tensors, str(d / "optimizer.safetensors"))
    (d / "optimizer.json").write_text(json.dumps({"state": state, "param_groups": sd["param_groups"]}))


def load_optimizer(opt, d: Path) -> bool:
    from safetensors.torch import load_file

    if not (d / "optimizer.json").is_file():
        return False
    meta = json.loads((d / "optimizer.json").read_text())
    tensors = load_file(str(d / "optimizer.safetensors"))
    state = {int(pid): {k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v
                        for k, v in st.items()} for pid, st in meta["state"].items()}
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    return True


def save_weights(model, d: Path, lora: bool) -> None:
    if lora:
        model.save_pretrained(str(d / "adapter"))  # adapter_config.json + adapter_model.safetensors
    else:
        from safetensors.torch import save_model

        save_model(model, str(d / "model.safetensors"))


def load_weights(model, d: Path, lora: bool) -> None:
    if lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(d / "adapter" / "adapter_model.safetensors")))
    else:
        from safetensors.torch import load_model

        load_model(model, str(d / "model.safetensors"))


def export_model(model, base: str, out: Path, lora: bool, adapter_out: Path | None, card: dict) -> None:
    """save_pretrained (+ processor files) so load_clap_model(out) works; LoRA: also the adapter alone."""
    from transformers import ClapProcessor

    def _replace(tmp: Path, final: Path):
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)

    out.parent.mkdir(parents=True, exist_ok=True)
    if lora and adapter_out is not None:
        tmp = Path(tempfile.mkdtemp(dir=adapter_out.parent, prefix=".adapter_tmp"))
        model.save_pretrained(str(tmp))
        _replace(tmp, adapter_out)
        merged = copy.deepcopy(model).merge_and_unload()
    else:
        merged = model
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".model_tmp"))
    merged.save_pretrained(str(tmp))
    ClapProcessor.from_pretrained(base).save_pretrained(str(tmp))
    from larcq_ray.models.model_card import MODEL_CARD

    (tmp / MODEL_CARD).write_text(json.dumps({**card, "trained": True}, indent=2))
    _replace(tmp, out)


# ---------------------------------------------------------------- batches + validation

def collate(batch: dict) -> dict:
    """numpy batch -> tensors; captions stay a list of JSON strings (tokenized in the loop)."""
    import torch

    return {"clip_id": [str(x) for x in batch["clip_id"]], "captions": [str(x) for x in batch["captions"]],
            "features": torch.as_tensor(np.asarray(batch["features"], dtype=np.float32)),
            "is_longer": torch.as_tensor(np.asarray(batch["is_longer"], dtype=bool))}


def pick_captions(batch: dict, seed: int, epoch: int) -> list[str]:
    """One caption per clip, drawn per (seed, epoch, clip): each epoch sees another caption."""
    out = []
    for cid, caps in zip(batch["clip_id"], batch["captions"]):
        caps = json.loads(caps)
        out.append(caps[random.Random(f"{seed}/{epoch}/{cid}").randrange(len(caps))])
    return out


def tokenize(tokenizer, texts: list[str], max_tokens: int, device):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def max_text_tokens(model, tokenizer) -> int:
    return int(min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings - 2))


def fit_channels(features, model):
    """Fusion models take 4 mel channels; features of an unfused extractor have 1."""
    want = 4 if model.config.audio_config.enable_fusion else 1
    if features.shape[1] == 1 and want == 4:
        return features.repeat(1, 4, 1, 1)
    return features


def evaluate_retrieval(model, tokenizer, batches, device, text_batch: int = 64) -> dict:
    """Text -> audio R@1 / R@5 over every (caption, clip) pair of the validation set."""
    import torch

    inner = model
    audio, texts, owner = [], [], []
    was_training = inner.training
    inner.eval()
    mt = max_text_tokens(inner, tokenizer)
    with torch.no_grad():
        n_clips = 0
        for b in batches:
            feats = fit_channels(b["features"].to(device), inner)
            out = inner.get_audio_features(input_features=feats, is_longer=b["is_longer"].reshape(-1, 1).to(device))
            audio.append(torch.nn.functional.normalize(out.pooler_output.float(), dim=-1))
            for caps in b["captions"]:
                for t in json.loads(caps):
                    texts.append(t)
                    owner.append(n_clips)  # caption -> the clip it was read with
                n_clips += 1
        if not audio:
            set_train_mode(inner, was_training)
            return {}
        audio = torch.cat(audio)
        text = []
        for s in range(0, len(texts), text_batch):
            ids, mask = tokenize(tokenizer, texts[s:s + text_batch], mt, device)
            text.append(torch.nn.functional.normalize(
                inner.get_text_features(input_ids=ids, attention_mask=mask).pooler_output.float(), dim=-1))
        text = torch.cat(text)
        sims = text @ audio.t()
        gt = torch.as_tensor(owner, device=sims.device)
        rank = (sims > sims.gather(1, gt[:, None])).sum(1)  # 0 = first
    set_train_mode(inner, was_training)
    return {"val_R@1": float((rank < 1).float().mean()), "val_R@5": float((rank < 5).float().mean()),
            "val_n_queries": len(texts), "val_n_clips": int(audio.shape[0])}


# ---------------------------------------------------------------- the loop

def _all_finite(flag: bool, device) -> bool:
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def train_loop_per_worker(c: dict) -> None:
    import torch

    import ray.train
    import ray.train.torch

    from larcq_ray.models.clap import load_tokenizer, quiet_transformers

    quiet_transformers()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if c.get("torch_threads"):
        torch.set_num_threads(int(c["torch_threads"]))
    torch.manual_seed(c["seed"])
    lora = c["lora"] if c["lora"]["enabled"] else None
    model = build_model(c["base"], lora, c["local_files_only"])
    freeze_parameters(model, c.get("freeze") or [])
    tokenizer = load_tokenizer(c["base"], c["local_files_only"])
    mt = max_text_tokens(model, tokenizer)

    state = {"step": 0, "epoch": 0, "epoch_step": 0, "best_R@1": None, "best_epoch": None, "history": [],
             "losses": []}
    ckpt = ray.train.get_checkpoint()
    ckpt_dir = None
    if ckpt is not None:
        ckpt_dir = Path(tempfile.mkdtemp(prefix="larcq_resume_"))
        with ckpt.as_directory() as d:
            shutil.copytree(d, ckpt_dir, dirs_exist_ok=True)
        load_weights(model, ckpt_dir, bool(lora))
        state.update(json.loads((ckpt_dir / STATE_FILE).read_text()))
    start_step = state["step"]

    device = ray.train.torch.get_device()
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    inner = ddp.module if hasattr(ddp, "module") else ddp
    params = [p for p in inner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(inner, c["lr"], c.get("param_lr") or {}), lr=c["lr"],
                            weight_decay=c["weight_decay"])
    if ckpt_dir is not None:
        load_optimizer(opt, ckpt_dir)
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    from larcq_ray.train.loss import clap_outputs_loss, shared_caption_positives

    run_dir = Path(c["run_dir"])
    max_steps = c["max_steps"] or math.inf
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if c["has_val"] else None
    last_ckpt_step = start_step if ckpt is not None else None
    recent: list[float] = []

    def write_progress(**extra) -> None:  # what the driver reads back (Result.metrics only has checkpointed reports)
        if rank == 0:
            (run_dir / PROGRESS_FILE).write_text(json.dumps({**state, "start_step": start_step, **extra}))

    write_progress()

    def base_metrics():
        return {"step": state["step"], "epoch": state["epoch"], "start_step": start_step,
                "loss": float(np.mean(recent)) if recent else None, "nan_at_step": None}

    def save_and_report(extra: dict) -> None:
        nonlocal last_ckpt_step
        metrics = {**base_metrics(), **extra}
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="larcq_ckpt_") as tmp:
                d = Path(tmp)
                save_weights(inner, d, bool(lora))
                save_optimizer(opt, d)
                (d / STATE_FILE).write_text(json.dumps(state))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            write_progress()
        else:
            ray.train.report(metrics)
        last_ckpt_step = state["step"]

    def validate() -> dict:
        out = {}
        if rank == 0 and val_shard is not None:
            batches = [collate(b) for b in val_shard.iter_batches(batch_size=c["val_batch_size"], batch_format="numpy")]
            out = evaluate_retrieval(inner, tokenizer, batches, device)
            entry = {"epoch": state["epoch"], "step": state["step"], **out}
            state["history"].append(entry)
            best = state["best_R@1"]
            if out and (best is None or out["val_R@1"] > best):
                state["best_R@1"], state["best_epoch"] = out["val_R@1"], state["epoch"]
                export_model(inner, c["base"], run_dir / "model_best", bool(lora),
                             run_dir / "adapter_best" if lora else None,
                             {"built_by": "larcq_ray.train", "base": c["base"], "lora": bool(lora),
                              "epoch": state["epoch"], "step": state["step"], **out})
        return out

    stopped = False
    while state["epoch"] < c["epochs"] and state["step"] < max_steps and not stopped:
        skip = state["epoch_step"]
        it = train_shard.iter_torch_batches(batch_size=c["batch_size"], drop_last=True, collate_fn=collate,
                                            local_shuffle_buffer_size=c.get("shuffle_buffer") or None,
                                            local_shuffle_seed=c["seed"] + state["epoch"])
        seen = 0
        t0 = time.time()
        for batch in it:
            seen += 1
            if seen <= skip:  # batches this epoch already trained on before the resume
                continue
            texts = pick_captions(batch, c["seed"], state["epoch"])
            ids, mask = tokenize(tokenizer, texts, mt, device)
            feats = fit_channels(batch["features"].to(device), inner)
            out = ddp(input_ids=ids, attention_mask=mask, input_features=feats,
                      is_longer=batch["is_longer"].reshape(-1, 1).to(device))
            positives = None
            if c.get("multi_positive", True):
                positives = shared_caption_positives(texts, [json.loads(x) for x in batch["captions"]])
            loss = clap_outputs_loss(out, positives)
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
            opt.step()
            with torch.no_grad():  # CLAP clamps its temperature like CLIP: scale <= 100
                for name in ("logit_scale_a", "logit_scale_t"):
                    p = getattr(inner, name, None)
                    if p is not None:
                        p.clamp_(max=math.log(100.0))
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
            save_and_report({k: v for k, v in val.items()} | {"epoch_end": True})
            recent = []
    if stopped:  # max_steps reached mid-epoch: validate what we have and keep it
        val = validate()
        save_and_report({**val, "epoch_end": False})
    elif state["step"] == start_step and ckpt is not None:
        ray.train.report({**base_metrics(), "nothing_to_do": True})
