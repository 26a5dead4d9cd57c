"""train-clap: loss, LoRA, Ray Train runs (2 workers, resume, NaN stop), retrieval after training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from larcq_ray.core.errors import LarcqError
from larcq_ray.offline import sound_world

SR = 48000
# sound_world kinds that are easy to tell apart: hum, high tone, static, sweep, beeps, siren, clicks, windy whistle
KINDS = ["low_tone", "high_tone", "white_noise", "rising_sweep", "short_beeps", "siren", "click_train",
         "whistling_wind"]


def _event(kind: str) -> sound_world.EventSpec:
    return sound_world.EventSpec(kind, {"loudness": "loud"})


def _captions(kind: str) -> list[str]:
    return sound_world.captions(_event(kind), "train")


def _render(kind: str, rng: np.random.Generator, seconds: float) -> np.ndarray:
    return sound_world.render(_event(kind), rng, seconds, SR)


def _write_pairs(folder: Path, kinds: list[str], per_kind: int = 1, seconds: float = 1.5, seed: int = 0,
                 bad: bool = False) -> Path:
    """Clotho layout: <folder>/audio/*.wav + <folder>/captions.csv (3 captions per file)."""
    audio = folder / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in kinds:
        caps = _captions(k)[:3]
        for j in range(per_kind):
            name = f"{k}_{j}.wav"
            sf.write(audio / name, _render(k, rng, seconds), SR)
            rows.append([name, *caps])
    if bad:
        (audio / "broken.wav").write_text("not audio at all\n" * 20)
        rows.append(["broken.wav", "a broken file", "it never decodes", "nothing"])
        rows[0][2] = ""  # one empty caption
    with open(folder / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption_1", "caption_2", "caption_3"])
        w.writerows(rows)
    return folder / "captions.csv"


@pytest.fixture(scope="module")
def fresh_model(tmp_path_factory):
    from larcq_ray.models.fresh_clap import build_fresh_clap

    texts = [c for k in KINDS for c in _captions(k)] * 10
    return build_fresh_clap(tmp_path_factory.mktemp("fresh"), texts, fusion=False, seed=0, dim=32, text_heads=2)


def _batch(model_dir: Path, n: int = 4, seed: int = 0):
    import torch

    from larcq_ray.models.clap import AudioFeaturizer, load_tokenizer

    fz = AudioFeaturizer(str(model_dir))
    tok = load_tokenizer(str(model_dir))
    rng = np.random.default_rng(seed)
    feats = np.stack([fz(_render(k, rng, 1.0)).input_features for k in KINDS[:n]])
    texts = [_captions(k)[0] for k in KINDS[:n]]
    enc = tok(texts, padding=True, return_tensors="pt")
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                input_features=torch.as_tensor(feats), is_longer=torch.zeros(n, 1, dtype=torch.bool))


def _cfg(tmp: Path, run: str, csv_path: Path, **train):
    from larcq_ray.config import PipelineConfig

    t = {"data": {"captions_csv": str(csv_path), "audio_dir": str(csv_path.parent / "audio"), "val_fraction": 0.0},
         "init": {"config": {"dim": 32, "vocab_size": 300}}, "batch_size": 4, "checkpoint_every_steps": 1,
         "num_workers": 1, "cpus_per_worker": 0.5, "lr": 1e-3, **train}
    return PipelineConfig.model_validate({"run_dir": str(tmp / run), "train": t})


def test_loss_matches_formula_and_all_params_get_gradients(fresh_model):
    import torch
    import torch.nn.functional as F

    from larcq_ray.models.clap import load_clap_model
    from larcq_ray.train.loss import clap_logits, clap_outputs_loss, symmetric_infonce

    model = load_clap_model(str(fresh_model), device="cpu").train()
    out = model(**_batch(fresh_model), return_loss=True)
    loss = clap_outputs_loss(out)
    assert torch.isfinite(loss)
    lpt, lpa = clap_logits(out.text_embeds, out.audio_embeds, model.logit_scale_t, model.logit_scale_a)
    assert torch.allclose(loss, symmetric_infonce(lpt, lpa), atol=1e-6)
    labels = torch.arange(4)
    # transformers' own loss averages text->audio with logits_per_audio.t() (text rows again):
    # its text->audio half is ours; its other half is not audio->text, so we do not use it.
    assert torch.allclose(out.loss, (F.cross_entropy(out.logits_per_text, labels)
                                     + F.cross_entropy(out.logits_per_audio.t(), labels)) / 2, atol=1e-6)
    assert torch.allclose(F.cross_entropy(lpt, labels), F.cross_entropy(out.logits_per_text, labels), atol=1e-6)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # the text pooler's dense layer, the fusion branch (unfused model) may be outside the graph
    assert all("pooler" in n or "fusion" in n for n in missing), missing
    assert model.logit_scale_a.grad is not None and model.logit_scale_t.grad is not None


def test_lora_trains_only_adapters_and_reloads_through_load_clap_model(fresh_model, tmp_path):
    import torch

    from larcq_ray.models.clap import load_clap_model
    from larcq_ray.train.loop import build_model
    from larcq_ray.train.loss import clap_outputs_loss

    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]}
    model = build_model(str(fresh_model), lora)
    base = {k: v.clone() for k, v in load_clap_model(str(fresh_model), device="cpu").state_dict().items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("text_model" in n for n in trainable) and any("audio_model" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(fresh_model)
    for _ in range(3):
        opt.zero_grad()
        clap_outputs_loss(model(**batch)).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if "lora_" not in n
               and not torch.equal(p.detach(), base[n.replace("base_model.model.", "").replace(".base_layer", "")])}
    assert not changed
    assert any(not torch.all(p == 0) for n, p in model.named_parameters() if "lora_B" in n)

    model.save_pretrained(str(tmp_path / "adapter"))
    model.eval()
    reloaded = load_clap_model(str(fresh_model), device="cpu", adapter=str(tmp_path / "adapter"))
    with torch.no_grad():
        a1 = model.get_audio_features(input_features=batch["input_features"], is_longer=batch["is_longer"]).pooler_output
        a2 = reloaded.get_audio_features(input_features=batch["input_features"], is_longer=batch["is_longer"]).pooler_output
        t1 = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        t2 = reloaded.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    assert torch.allclose(a1, a2, atol=1e-5) and torch.allclose(t1, t2, atol=1e-5)
    with pytest.raises(LarcqError, match="not a peft adapter"):
        load_clap_model(str(fresh_model), device="cpu", adapter=str(tmp_path))


def test_two_workers_checkpoint_resume_and_skipped_inputs(ray_session, tmp_path):
    from larcq_ray.models.clap import load_clap_model
    from larcq_ray.train.job import run_train_clap

    csv_path = _write_pairs(tmp_path / "data", KINDS, per_kind=1, bad=True)
    cfg = _cfg(tmp_path, "run", csv_path, num_workers=2, batch_size=2, max_steps=2, epochs=10,
               data={"captions_csv": str(csv_path), "audio_dir": str(csv_path.parent / "audio"), "val_fraction": 0.25})
    s1 = run_train_clap(cfg)
    run = tmp_path / "run"
    assert s1["resumed_from_step"] == 0 and s1["steps"] == 2
    assert s1["skipped"]["empty_caption"] == 1 and s1["skipped"]["audio_failed"] == 1
    rows = list(csv.DictReader(open(run / "train_skipped.csv")))
    assert {r["reason"].split(":")[0] for r in rows} == {"empty caption", "audio failed"}
    assert s1["n_train_clips"] + s1["n_val_clips"] == len(KINDS)  # broken.wav left out
    ckpts = [p for p in (run / "ray_train" / "train_clap").glob("checkpoint_*") if p.is_dir()]
    assert 1 <= len(ckpts) <= 2
    assert (run / "model_best" / "config.json").is_file()
    load_clap_model(str(run / "model_best"), device="cpu")

    s2 = run_train_clap(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4})}))
    assert s2["resumed_from_step"] == 2 and s2["steps"] == 4
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["val_history"]


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(ray_session, tmp_path):
    from larcq_ray.train.job import run_train_clap
    from larcq_ray.train.loop import STATE_FILE

    csv_path = _write_pairs(tmp_path / "data", KINDS[:4], per_kind=1)
    cfg = _cfg(tmp_path, "run", csv_path, max_steps=10, epochs=10, debug_nan_at_step=3)
    with pytest.raises(LarcqError, match=r"loss became NaN at step 3; last good checkpoint: .*checkpoint_") as e:
        run_train_clap(cfg)
    ckpt = Path(str(e.value).split("last good checkpoint: ")[1].split(" ")[0])
    assert json.loads((ckpt / STATE_FILE).read_text())["step"] == 2
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "optimizer.safetensors").is_file()
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.pkl"))


def test_training_retrieves_its_pairs_far_above_chance(ray_session, tmp_path):
    from larcq_ray.train.job import run_train_clap

    csv_path = _write_pairs(tmp_path / "data", KINDS, per_kind=1)
    # validation = the training pairs themselves (8 clips x 3 captions): chance R@1 is 1/8
    cfg = _cfg(tmp_path, "run", csv_path, batch_size=8, epochs=60, lr=2e-3, checkpoint_every_steps=1000,
               data={"captions_csv": str(csv_path), "audio_dir": str(csv_path.parent / "audio"),
                     "val_csv": str(csv_path)})
    s = run_train_clap(cfg)
    print("retrieval after training:", s["val_history"][-1], "best", s["best_val_R@1"])
    assert s["best_val_R@1"] >= 3 / len(KINDS)


def test_cli_trains_from_provenance_with_a_frozen_grafted_text_tower(ray_session, tmp_path):
    """`larcq-ray train-clap` on a LARCQ provenance.parquet: segments of long audios are the clips,
    the text tower is all-MiniLM-L6-v2 grafted in (init.config.text_from) and stays frozen."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from safetensors.torch import load_file

    from larcq_ray.cli import main
    from larcq_ray.offline.demo_clap import minilm_path

    bench = tmp_path / "bench"
    (bench / "audios").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for a in range(3):
        parts, t = [], 0.0
        for pos, k in enumerate(KINDS[(3 * a + i) % len(KINDS)] for i in range(3)):
            x = _render(k, rng, 1.0)
            rows.append({"audio_id": f"long_{a}.wav", "position": pos, "source_file": f"{k}_{a}.wav",
                         "caption": _captions(k)[0] if a != 2 or pos else "", "start_s": t,
                         "end_s": t + 1.0})
            parts.append(x)
            t += 1.0
        sf.write(bench / "audios" / f"long_{a}.wav", np.concatenate(parts), SR)
    pq.write_table(pa.Table.from_pylist(rows), bench / "provenance.parquet")
    cfg = {"run_dir": str(tmp_path / "run"), "train": {
        "data": {"provenance": str(bench / "provenance.parquet"), "val_fraction": 0.0},
        "init": {"config": {"dim": 32, "audio_depths": [1, 1], "audio_heads": [1, 2], "patch_embeds_hidden_size": 8,
                            "audio_patch_size": 8, "audio_window_size": 4, "text_from": str(minilm_path())},
                 "local_files_only": True},
        "freeze": ["text_model.embeddings", "text_model.encoder"],
        "batch_size": 4, "max_steps": 2, "epochs": 5, "checkpoint_every_steps": 1, "num_workers": 1,
        "cpus_per_worker": 0.5, "lr": 1e-3}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train-clap", "--config", str(tmp_path / "c.yaml")]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["n_train_clips"] == 8 and summary["skipped"]["empty_caption"] == 1
    start = load_file(str(tmp_path / "run" / "init_model" / "model.safetensors"))
    ckpt = sorted(p for p in (tmp_path / "run" / "ray_train" / "train_clap").glob("checkpoint_*") if p.is_dir())[-1]
    end = load_file(str(ckpt / "model.safetensors"))
    name = "text_model.encoder.layer.5.output.dense.weight"
    assert torch_equal(start[name], end[name])  # frozen
    assert not torch_equal(start["audio_projection.linear1.weight"], end["audio_projection.linear1.weight"])
    assert not torch_equal(start["text_model.pooler.dense.weight"], end["text_model.pooler.dense.weight"])

    cfg["train"]["freeze"] = ["no_such_module"]
    cfg["run_dir"] = str(tmp_path / "run2")
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train-clap", "--config", str(tmp_path / "c2.yaml")]) == 2  # a clear error, no traceback


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
