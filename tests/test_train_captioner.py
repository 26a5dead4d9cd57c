"""train-captioner: Ray Train runs of tiny captioners (2 workers, resume, validation loss, NaN stop),
the seed-001 / seed-002 jsonl readers, and the caption metrics."""

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
KINDS = ["low_tone", "high_tone", "white_noise", "rising_sweep", "short_beeps", "siren", "click_train",
         "whistling_wind"]
PROMPT = "USER: Describe the audio you hear.\n ASSISTANT:"
FAST_METRICS = ["bleu", "rouge_l", "cider_d"]  # METEOR starts a JVM (~15 s): the metrics test runs it once


def _captions(kind: str) -> list[str]:
    return sound_world.captions(sound_world.EventSpec(kind, {"loudness": "loud"}), "train")


def _write_clotho(folder: Path, kinds: list[str], bad: bool = False, seconds: float = 1.5) -> Path:
    audio = folder / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in kinds:
        sf.write(audio / f"{k}.wav", sound_world.render(sound_world.EventSpec(k, {"loudness": "loud"}), rng,
                                                        seconds, SR), SR)
        rows.append([f"{k}.wav", *_captions(k)[:3]])
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
def models(tmp_path_factory):
    from larcq_ray.offline.tiny_clap import build_tiny_clap
    from larcq_ray.offline.tiny_lm import build_tiny_causal_lm

    texts = [c for k in KINDS for c in _captions(k)]
    root = tmp_path_factory.mktemp("captioner_models")
    clap = build_tiny_clap(root / "clap", texts * 10, fusion=False, seed=0, dim=32)
    lm = build_tiny_causal_lm(root / "lm", texts * 5 + [PROMPT] * 5, seed=0, vocab_size=300, hidden_size=32)
    return clap, lm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write_clotho(tmp_path_factory.mktemp("captioner_data"), KINDS, bad=True)


def _cfg(tmp: Path, models, data_section: dict, **section):
    from larcq_ray.config import PipelineConfig

    clap, lm = models
    t = {"model": {"encoder": {"name_or_path": str(clap)}, "connector": {"k": 4},
                   "decoder": {"name_or_path": str(lm), "train": "lora",
                               "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                        "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}}},
         "data": data_section, "batch_size": 2, "checkpoint_every_steps": 2, "num_workers": 1,
         "cpus_per_worker": 0.5, "lr": 1e-2, "local_files_only": True, "metrics": FAST_METRICS,
         "val_caption_items": 2, "val_max_new_tokens": 8, **section}
    return PipelineConfig.model_validate({"run_dir": str(tmp / "run"), "train_captioner": t})


def test_two_workers_nan_stop_then_resume_to_completion(ray_session, tmp_path, models, data):
    """Run 1 (2 workers) trains 4 steps, validating each epoch, until a NaN loss at step 5 stops it:
    its message names the step and the last good checkpoint (step 4), which the re-run resumes from
    and trains on to max_steps. (One test: each Ray Train run costs ~40 s of start-up on 2 cores.)"""
    from safetensors.torch import load_file

    from larcq_ray.caption.prefix_lm import PrefixLm
    from larcq_ray.train.captioner_job import run_train_captioner
    from larcq_ray.train.captioner_loop import STATE_FILE

    d = {"captions_csv": str(data), "audio_dir": str(data.parent / "audio"), "val_csv": str(data)}
    cfg = _cfg(tmp_path, models, d, num_workers=2, max_steps=10, epochs=10, debug_nan_at_step=5)
    run = tmp_path / "run"
    with pytest.raises(LarcqError, match=r"loss became NaN at step 5; last good checkpoint: .*checkpoint_") as e:
        run_train_captioner(cfg)
    ckpt = Path(str(e.value).split("last good checkpoint: ")[1].split(" ")[0])
    assert json.loads((ckpt / STATE_FILE).read_text())["step"] == 4
    keys = set(load_file(str(ckpt / "trainable.safetensors")))
    assert keys and all(k.startswith("connector.") or "lora_" in k for k in keys)  # the trainable state only
    assert (ckpt / "optimizer.safetensors").is_file() and (ckpt / "optimizer.json").is_file()
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.pkl"))
    s1 = json.loads((run / "train_captioner_summary.json").read_text())
    assert s1["status"] == "nan" and s1["nan_at_step"] == 5 and s1["steps"] == 4
    # skipped inputs, counted with reasons (the broken file twice: train and val read the same CSV)
    assert s1["skipped"]["empty_caption"] == 2 and s1["skipped"]["audio_failed"] == 2
    rows = list(csv.DictReader(open(run / "train_captioner_skipped.csv")))
    assert {r["reason"].split(":")[0] for r in rows} == {"empty caption", "audio failed"}
    assert s1["n_train_clips"] == len(KINDS)
    hist = s1["val_history"]
    assert hist[0]["step"] == 0 and "val_BLEU_4" not in hist[0]  # the loss before training
    at4 = [h for h in hist if h["step"] == 4][-1]
    print("validation loss", hist[0]["val_loss"], "->", at4["val_loss"], "; generated:", at4.get("val_examples"))
    assert at4["val_loss"] < hist[0]["val_loss"]
    assert at4["val_metrics_items"] == 2 and {"val_BLEU_4", "val_ROUGE_L", "val_CIDEr_D"} <= set(at4)

    s2 = run_train_captioner(cfg.model_copy(update={"train_captioner": cfg.train_captioner.model_copy(
        # the resumed run runs the encoder at every step (run 1 trained on its cached frames)
        update={"max_steps": 6, "debug_nan_at_step": None, "cache_encoder_frames": False})}))
    assert s2["status"] == "ok" and s2["resumed_from_step"] == 4 and s2["steps"] == 6
    assert [h["step"] for h in s2["val_history"]][0] == 0 and s2["val_history"][-1]["step"] == 6
    assert json.loads((run / "train_captioner_summary.json").read_text())["steps"] == 6
    ckpts = sorted(p for p in (run / "ray_train" / "train_captioner").glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(ckpts) <= 2

    best = run / "captioner_best"
    assert s2["paths"]["captioner_best"] == str(best) and s2["best"]["by"] == "val_loss"
    assert (best / "connector.safetensors").is_file() and (best / "decoder_adapter").is_dir()
    lm = PrefixLm.load(best, local_files_only=True)  # what caption.backend {kind: prefix-lm, model: best} loads
    assert lm.cfg.trained["step"] == s2["best"]["step"]
    x = sf.read(data.parent / "audio" / f"{KINDS[0]}.wav", dtype="float32")[0]
    assert len(lm.generate(lm.featurize([x]), max_new_tokens=4)) == 1


def test_cached_frames_give_the_same_prefix_and_lr_schedule(models):
    """EncoderFramesStage's frames (what training reads when the encoder is frozen) give the very
    prefix the encoder gives at caption time; the cosine schedule warms up, then decays to 0."""
    import numpy as np
    import torch

    from larcq_ray.caption.prefix_lm import FRAMES_INPUT, PrefixLm, PrefixLmConfig
    from larcq_ray.train.captioner_data import FEATURE_PREFIX, EncoderFramesStage
    from larcq_ray.train.captioner_loop import lr_at

    clap, lm_dir = models
    lm = PrefixLm(PrefixLmConfig.model_validate({"encoder": {"name_or_path": str(clap)}, "connector": {"k": 4},
                                                 "decoder": {"name_or_path": str(lm_dir)}}), local_files_only=True)
    rng = np.random.default_rng(0)
    feats = lm.featurize([rng.standard_normal(lm.sample_rate * n).astype(np.float32) * 0.1 for n in (1, 3)])
    stage = EncoderFramesStage(encoder=str(clap), local_files_only=True, device="cpu")
    stage.setup()
    out = stage.process_batch({"clip_id": np.array(["a", "b"]), "captions": np.array(["[]", "[]"]),
                               **{FEATURE_PREFIX + k: v for k, v in feats.items()}})
    assert list(out["status"]) == ["ok", "ok"]
    with torch.no_grad():
        direct = lm.prefix(feats)
        cached = lm.prefix({FRAMES_INPUT: out[FEATURE_PREFIX + FRAMES_INPUT]})
    assert torch.allclose(direct, cached, atol=1e-5)

    c = {"lr": 1.0, "warmup_steps": 10, "lr_schedule": "cosine", "total_steps": 110}
    assert lr_at(c, 5) == 0.5 and lr_at(c, 10) == 1.0
    assert abs(lr_at(c, 60) - 0.5) < 1e-9 and lr_at(c, 110) < 1e-9
    assert lr_at({**c, "lr_schedule": "constant"}, 100) == 1.0


def test_seed_jsonl_readers(tmp_path):
    from larcq_ray.train.captioner_data import read_jsonl

    (tmp_path / "wav").mkdir()
    slam = tmp_path / "slam.jsonl"  # seed 001: {"key", "source", "target"}
    slam.write_text("\n".join([
        json.dumps({"key": "a_1", "source": str(tmp_path / "wav" / "a.wav"), "target": "A dog barks."}),
        json.dumps({"key": "a_2", "source": str(tmp_path / "wav" / "a.wav"), "target": "a dog is barking"}),
        json.dumps({"key": "b_1", "source": "wav/b.wav", "target": "rain falls"}),  # relative: the jsonl's folder
        json.dumps({"key": "c_1", "source": "wav/c.wav", "target": "  "}),
        "{not json",
        "",
    ]) + "\n")
    got = read_jsonl(slam)
    assert [(c.clip_id, c.path, c.captions) for c in got.clips] == [
        ("a_1", str(tmp_path / "wav" / "a.wav"), ["A dog barks.", "a dog is barking"]),
        ("b_1", str(tmp_path / "wav" / "b.wav"), ["rain falls"])]
    assert sorted(r["reason"].split(":")[0] for r in got.skipped) == ["bad jsonl row", "empty caption"]
    elsewhere = read_jsonl(slam, audio_dir=tmp_path / "elsewhere")  # relative sources: audio_dir when given
    assert elsewhere.clips[1].path == str(tmp_path / "elsewhere" / "wav" / "b.wav")

    drcap = tmp_path / "drcap.jsonl"  # seed 002: {"key", "target", "text"}
    drcap.write_text("\n".join(json.dumps(r) for r in [
        {"key": "Y7fm_1", "target": "Constant rattling noise", "text": "Constant rattling noise"},
        {"key": "Y7fm_2", "target": "sharp vibrations", "text": "sharp vibrations"},
        {"key": "Y6BJ_1", "target": "", "text": ""},
        {"key": "Y9_1", "target": "a rocket flies by", "text": "a rocket flies by", "source": "wav/r.wav"},
    ]) + "\n")
    text_only = read_jsonl(drcap, need_audio=False)
    assert [(c.clip_id, c.path, c.group, c.captions) for c in text_only.clips] == [
        ("Y7fm_1", "", "Y7fm", ["Constant rattling noise"]), ("Y7fm_2", "", "Y7fm", ["sharp vibrations"]),
        ("Y9_1", str(tmp_path / "wav" / "r.wav"), str(tmp_path / "wav" / "r.wav"), ["a rocket flies by"])]
    with_audio = read_jsonl(drcap, need_audio=True)  # prefix-lm: text-only rows are skipped, with the reason
    assert [c.clip_id for c in with_audio.clips] == ["Y9_1"]
    assert sorted(r["reason"].split(":")[0] for r in with_audio.skipped) == ["empty caption", "no audio", "no audio"]
    with pytest.raises(LarcqError, match="jsonl file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_caption_metrics_hand_case():
    from larcq_ray.evaluate.caption_metrics import caption_metrics

    refs = {"a": ["A dog barks loudly.", "a dog is barking"], "b": ["Rain falls on a tin roof.", "heavy rain"],
            "c": ["A car passes by on a wet street.", "a car drives past"]}
    same = caption_metrics({k: v[0] for k, v in refs.items()}, refs)
    other = caption_metrics({"a": "rain falls", "b": "a car drives", "c": "a dog barks", "x": "no reference"}, refs,
                            FAST_METRICS)
    print(json.dumps(same, indent=1))
    assert {"bleu", "rouge_l", "cider_d"} <= set(same["ran"])
    assert same["n_items"] == 3 and other["n_items"] == 3 and other["n_without_reference"] == 1
    for name in ("BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr_D"):
        assert same["scores"][name] > other["scores"][name], name
    assert same["scores"]["BLEU_4"] == pytest.approx(1.0) and same["scores"]["ROUGE_L"] == pytest.approx(1.0)
    # METEOR runs where Java does; SPICE needs models that are downloaded at first use: reported, not raised
    import shutil

    if shutil.which("java"):
        assert "meteor" in same["ran"] and same["scores"]["METEOR"] == pytest.approx(1.0)  # its maximum
        assert same["tokenizer"] == "ptb"
    else:
        assert "meteor" in same["not_run"] and same["tokenizer"].startswith("simple")
    spice = same["not_run"].get("spice", "")
    assert "spice" in same["ran"] or "Stanford CoreNLP" in spice or "java" in spice
    assert set(same["ran"]) | set(same["not_run"]) >= {"bleu", "meteor", "rouge_l", "cider_d", "spice"}
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_metrics({}, {}, ["bleu", "spider"])


def test_drcap_trains_from_captions_through_the_loop_pieces(tmp_path, models, data):
    """kind: drcap without Ray Train (its Ray path is the prefix-lm one with text batches): the loss
    module's steps change only the projector and the LoRA weights, the checkpoint state round-trips,
    validation generates from audio, and the best folder loads as a drcap captioner."""
    import torch

    from larcq_ray.caption.drcap import DrCap
    from larcq_ray.train.captioner_data import read_captions_csv
    from larcq_ray.train.captioner_loop import (_loss_module, build_captioner, load_trainable, save_trainable,
                                                trainable_keys, validate_drcap)

    clap, lm_dir = models
    texts = [c for k in KINDS for c in _captions(k)]
    (tmp_path / "texts.csv").write_text("caption\n" + "\n".join(texts) + '\n""\n')  # + one empty caption
    got = read_captions_csv(tmp_path / "texts.csv", None, need_audio=False)
    assert len(got.clips) == len(texts) and [r["reason"] for r in got.skipped] == ["empty caption"]
    with pytest.raises(LarcqError, match="kind: drcap only"):
        read_captions_csv(tmp_path / "texts.csv", None, need_audio=True)

    c = {"kind": "drcap", "local_files_only": True, "init_folder": None, "datastore": texts, "seed": 0,
         "val_batch_size": 8, "val_caption_items": 2, "val_num_beams": 1, "val_max_new_tokens": 4,
         "model": {"kind": "drcap", "clap": {"name_or_path": str(clap)}, "top_k": 2,
                   "decoder": {"name_or_path": str(lm_dir), "train": "lora", "lora": {"r": 4, "alpha": 8}}}}
    torch.manual_seed(0)
    lm = build_captioner(c, "cpu")
    keys = trainable_keys(lm, "drcap")
    assert keys and all(k.startswith("projector.") or "lora_" in k for k in keys)
    before = {k: v.clone() for k, v in lm.module.state_dict().items()}
    loss_fn = _loss_module(lm, "drcap")
    opt = torch.optim.AdamW([p for p in lm.module.parameters() if p.requires_grad], lr=1e-2)
    lm.set_train(True)
    for step in range(2):
        loss = loss_fn(None, texts[4 * step:4 * step + 4], step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = lm.module.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= set(keys)

    save_trainable(lm, "drcap", tmp_path)
    torch.manual_seed(1)
    fresh = build_captioner(c, "cpu")
    load_trainable(fresh, "drcap", tmp_path)
    assert all(torch.equal(fresh.module.state_dict()[k], after[k]) for k in keys)

    x = sf.read(data.parent / "audio" / f"{KINDS[0]}.wav", dtype="float32")[0]
    audio = [{"clip_id": np.asarray(["a"], dtype=object), "samples": np.asarray([x.tobytes()], dtype=object),
              "captions": np.asarray([json.dumps(_captions(KINDS[0])[:2])], dtype=object)}]
    val = [{"caption": np.asarray(texts[:6], dtype=object)}]
    lm.set_train(False)
    figures, preds, refs = validate_drcap(lm, val, audio, c, generate=True)
    assert figures["val_pairs"] == 6 and np.isfinite(figures["val_loss"]) and list(preds) == ["a"]
    assert refs["a"] == _captions(KINDS[0])[:2]
    lm.save(tmp_path / "best", {"step": 2})
    assert DrCap.load(tmp_path / "best", local_files_only=True).cfg.trained == {"step": 2}
