"""eval-alm (seed 004's evaluation): the test list, submission.csv and its validator, WER/CER and a
caption metric on hand-made pairs, TTFT/TPOT on tiny models, and an end-to-end run through Ray on
sound-world clips with the demo captioner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from larcq_ray.cli import main
from larcq_ray.core.errors import LarcqError
from larcq_ray.evaluate.alm_submission import HEADER, validate_submission, write_submission
from larcq_ray.evaluate.alm_testlist import parse_entries, read_test_list, select
from larcq_ray.evaluate.asr_metrics import asr_metrics, normalize_text

from conftest import CAPTIONS


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> Path:
    from larcq_ray.offline.demo_captioner import assemble_demo_captioner
    from larcq_ray.offline.demo_clap import assemble_demo_clap

    root = tmp_path_factory.mktemp("eval_alm_models")
    return assemble_demo_captioner(root / "captioner", assemble_demo_clap(root / "model"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> tuple[Path, list[list[str]]]:
    from larcq_ray.offline.sound_world import write_clip_dataset

    out = write_clip_dataset(tmp_path_factory.mktemp("eval_alm_clips"), n_clips=4, seed=3, duration_s=(2.0, 4.0))
    with open(out / "captions.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    return out, rows


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# --- the test list ---------------------------------------------------------------------------

def test_a_test_list_that_is_not_json_or_lacks_annotation_is_one_clear_error(tmp_path):
    with pytest.raises(LarcqError, match="not valid JSON"):
        read_test_list(_write(tmp_path / "a.json", "{not json"))
    with pytest.raises(LarcqError, match='no "annotation"'):
        read_test_list(_write(tmp_path / "b.json", {"items": []}))
    with pytest.raises(LarcqError, match='no "annotation"'):
        read_test_list(_write(tmp_path / "c.json", [1, 2]))
    with pytest.raises(LarcqError, match="must be a list"):
        read_test_list(_write(tmp_path / "d.json", {"annotation": {"x": 1}}))
    with pytest.raises(LarcqError, match="not found"):
        read_test_list(tmp_path / "missing.json")


def test_each_malformed_entry_costs_only_itself(tmp_path):
    entries = parse_entries({"annotation": [
        {"testset_id": "a", "path": "x.wav", "task": "asr", "test": "Hello"},
        "just a string",
        {"path": "y.wav", "task": "asr"},
        {"testset_id": "c", "task": "audiocaption_v2"},
        {"testset_id": "d", "path": "z.wav"},
        {"testset_id": "e", "path": "z.wav", "task": "translate"},
        {"testset_id": "a", "path": "x2.wav", "task": "asr"},
        {"testset_id": 7, "path": "/abs/w.wav", "task": "audiocaption_v2"},
        {"testset_id": "g", "path": "v.wav", "task": "asr", "test": 3},
        {"testset_id": "", "path": "v.wav", "task": "asr"},
    ]}, root=tmp_path)
    errors = [e.error.split(":")[0] for e in entries]
    assert errors == ["", "malformed", "malformed", "malformed", "malformed", "unknown task", "duplicate", "",
                      "malformed", "malformed"]
    assert entries[0].path == str(tmp_path / "x.wav") and entries[0].reference == "Hello"
    assert entries[7].testset_id == "7" and entries[7].path == "/abs/w.wav" and entries[7].reference is None
    assert "no testset_id" in entries[2].error and "no path" in entries[3].error and "no task" in entries[4].error
    assert entries[1].row_id == "#1"

    asr = select(entries, "asr")
    assert [e.row_id for e in asr.to_run] == ["a"]
    # The aac entries (c, 7) are skipped; entries without a task or with an unknown one stay as error rows.
    assert asr.skipped_other_task == 2
    assert asr.submission_ids() == ["a", "d", "e", "g"]
    aac = select(entries, "aac")
    assert [e.row_id for e in aac.to_run] == ["7"] and aac.skipped_other_task == 5
    with pytest.raises(LarcqError, match="unknown task"):
        select(entries, "translate")


# --- submission.csv and its validator --------------------------------------------------------

def _list(tmp_path: Path) -> Path:
    return _write(tmp_path / "list.json", {"annotation": [
        {"testset_id": "s1", "path": "1.wav", "task": "asr"},
        {"testset_id": "s2", "path": "2.wav", "task": "asr"},
        {"testset_id": "c1", "path": "3.wav", "task": "audiocaption_v2"},
    ]})


def test_submission_shape_and_the_validators_verdicts(tmp_path, capsys):
    test_list = _list(tmp_path)
    sub = write_submission(tmp_path / "submission.csv", [("s1", "Hello  World"), ("s2", "A,\nquoted text")])
    with open(sub, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [HEADER, ["s1", "hello world"], ["s2", "a, quoted text"]]
    assert validate_submission(sub, test_list) == ([], "asr")
    assert main(["validate-submission", str(sub), str(test_list)]) == 0
    assert "valid for task asr" in capsys.readouterr().out

    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\ns1,hello\ns1,again\nzz,what\nc1,\n")
    problems, task = validate_submission(bad, test_list, "asr")
    assert task == "asr"
    joined = "\n".join(problems)
    assert "header is 'id,text'" in joined and "'s1' appears 2 times" in joined
    assert "'zz' is not a asr entry" in joined and "'c1' is not a asr entry" in joined
    assert "'s2' is missing" in joined and "'c1' has an empty text" in joined
    assert len(problems) == 6
    assert main(["validate-submission", str(bad), str(test_list), "--task", "asr"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 7 and out[-1].endswith("6 problem(s) (task asr, test list %s)" % test_list)

    (tmp_path / "empty.csv").write_text("")
    assert main(["validate-submission", str(tmp_path / "empty.csv"), str(test_list)]) == 1
    assert main(["validate-submission", str(sub), str(_write(tmp_path / "x.json", "nope"))]) == 2
    assert "not valid JSON" in capsys.readouterr().err


# --- quality ---------------------------------------------------------------------------------

def test_wer_and_cer_on_hand_made_pairs():
    assert normalize_text("  Hello,   WORLD! It's  fine.") == "hello world its fine"
    m = asr_metrics(["the cat sat on mat", "HELLO world!"], ["The cat sat on the mat.", "hello, world"])
    # 1 deletion over 6 + 2 reference words; punctuation and case do not count.
    assert m["wer"] == pytest.approx(1 / 8) and m["deletions"] == 1 and m["ref_words"] == 8
    assert m["cer"] == pytest.approx(4 / (len("the cat sat on the mat") + len("hello world")))
    m = asr_metrics(["a b x d", ""], ["a b c d", "e f"])  # 1 substitution + 2 deletions over 6 words
    assert m["wer"] == pytest.approx(3 / 6) and m["substitutions"] == 1 and m["deletions"] == 2
    m = asr_metrics(["a b c"], ["a b"])
    assert m["wer"] == pytest.approx(0.5) and m["insertions"] == 1
    m = asr_metrics(["anything"], ["  ...  "])
    assert m["wer"] is None and m["n_empty_reference"] == 1


def test_a_caption_metric_on_a_hand_made_pair():
    from larcq_ray.evaluate.caption_metrics import caption_metrics

    r = caption_metrics({"a": "a dog barks", "b": "a dog"}, {"a": ["A dog barks."], "b": ["a dog barks"]},
                        metrics=["bleu"])
    assert r["ran"] == ["bleu"] and r["n_items"] == 2
    # Corpus BLEU-1: every one of the 5 predicted words is in its reference; brevity penalty exp(1 - 6/5).
    assert r["scores"]["BLEU_1"] == pytest.approx(np.exp(1 - 6 / 5), abs=1e-3)


# --- cost ------------------------------------------------------------------------------------

def _long_prompt() -> str:
    return "Describe the sound you hear in this recording in great detail, " * 40


def test_ttft_and_tpot_of_the_demo_captioner(captioner):
    from larcq_ray.caption.backends import build_caption_backend
    from larcq_ray.caption.config import CaptionBackendConfig
    from larcq_ray.evaluate.alm_cost import measure_cost

    b = build_caption_backend(CaptionBackendConfig(kind="prefix-lm", model=str(captioner), window_s=2.5,
                                                   device="cpu", local_files_only=True))
    wave = (0.1 * np.random.default_rng(0).standard_normal(int(2.5 * b.sample_rate))).astype(np.float32)
    c = measure_cost(b, "prefix-lm", [wave], prompt=_long_prompt(), warmup_runs=1, timed_runs=3)
    assert c["ttft_ms_mean"] > 0 and c["tpot_ms_mean"] > 0 and c["peak_memory_mb"] > 0
    assert c["ttft_ms_median"] > c["tpot_ms_median"]
    assert c["prefill_tokens_mean"] > 300 and c["batch_size"] == 1 and c["timed_runs"] == 3
    with pytest.raises(ValueError, match="no cost measurement"):
        measure_cost(b, "nope", [wave])


def test_ttft_and_tpot_of_a_tiny_hf_audio_lm(tmp_path):
    from larcq_ray.caption.backends import build_caption_backend
    from larcq_ray.caption.config import CaptionBackendConfig
    from larcq_ray.evaluate.alm_cost import measure_cost
    from larcq_ray.offline.tiny_alm import build_tiny_qwen2_audio

    model = build_tiny_qwen2_audio(tmp_path / "alm", CAPTIONS * 20, seed=0)
    b = build_caption_backend(CaptionBackendConfig(model=str(model), local_files_only=True, device="cpu"))
    wave = (0.1 * np.random.default_rng(1).standard_normal(2 * b.sample_rate)).astype(np.float32)
    c = measure_cost(b, "hf-audio-lm", [wave], prompt=_long_prompt(), warmup_runs=1, timed_runs=3)
    assert c["ttft_ms_mean"] > 0 and c["tpot_ms_mean"] > 0
    assert c["ttft_ms_median"] > c["tpot_ms_median"]
    assert c["prompt"] == _long_prompt() and b.prompt == CaptionBackendConfig().prompt  # the backend is unchanged


# --- end to end through Ray ------------------------------------------------------------------

def test_eval_alm_end_to_end(ray_session, captioner, clips, tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="larcq_ray")
    audio_dir, caps = clips
    annotation = [
        {"testset_id": "aac_0", "path": str(audio_dir / "audio" / caps[0][0]), "task": "audiocaption_v2",
         "test": caps[0][1]},
        {"testset_id": "aac_1", "path": f"audio/{caps[1][0]}", "task": "audiocaption_v2", "test": caps[1][1]},
        {"testset_id": "asr_0", "path": str(audio_dir / "audio" / caps[2][0]), "task": "asr", "test": "a b c"},
        {"testset_id": "aac_missing", "path": str(tmp_path / "nope.wav"), "task": "audiocaption_v2", "test": "x"},
        {"testset_id": "aac_bad", "task": "audiocaption_v2"},
        {"testset_id": "aac_2", "path": str(audio_dir / "audio" / caps[3][0]), "task": "audiocaption_v2",
         "test": caps[3][1]},
    ]
    test_list = _write(tmp_path / "test.json", {"annotation": annotation})
    cfg = {"caption": {"backend": {"kind": "prefix-lm", "model": str(captioner), "window_s": 2.5, "device": "cpu",
                                   "local_files_only": True, "max_new_tokens": 12}},
           "eval_alm": {"audio_root": str(audio_dir), "batch_size": 2,
                        "cost": {"warmup_runs": 1, "timed_runs": 2, "items": 2}}}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["eval-alm", "--config", str(cfg_path), "--test-list", str(test_list), "--task", "aac",
                 "--out", str(out)]) == 0
    err = caplog.text
    assert "5 evaluated, 3 ok, 2 errors; 1 other-task entries skipped" in err
    assert "error: aac_missing: missing" in err and "error: aac_bad: malformed" in err and "CIDEr_D" in err

    with open(out / "submission.csv", newline="") as f:
        sub = list(csv.reader(f))
    assert sub[0] == HEADER and [r[0] for r in sub[1:]] == ["aac_0", "aac_1", "aac_missing", "aac_bad", "aac_2"]
    texts = dict(sub[1:])
    assert all(texts[k] and texts[k] == texts[k].lower() for k in ("aac_0", "aac_1", "aac_2"))
    assert texts["aac_missing"] == "" and texts["aac_bad"] == ""

    pred = pq.read_table(out / "predictions.parquet").to_pandas()
    assert list(pred.columns) == ["id", "path", "task", "prediction", "reference", "status", "error"]
    assert list(pred.status) == ["ok", "ok", "failed", "failed", "ok"]
    assert pred.set_index("id").loc["aac_1", "path"] == str(audio_dir / "audio" / caps[1][0])

    ev = json.loads((out / "eval.json").read_text())
    assert ev["seed_task"] == "audiocaption_v2" and ev["backend"]["prompt"] == "Describe the sound:"
    assert ev["counts"] == {"entries": 6, "evaluated": 5, "ok": 3, "errors": 2, "skipped_other_task": 1,
                            "with_reference": 4, "error_kinds": {"missing": 1, "malformed": 1}}
    q = ev["quality"]
    assert {"bleu", "rouge_l", "cider_d"} <= set(q["ran"]) and "spice" in q["not_run"]
    assert q["n_items"] == 4 and q["n_failed_scored_as_empty"] == 1
    c = ev["cost"]
    assert c["ttft_ms_mean"] > 0 and c["tpot_ms_mean"] > 0 and c["peak_memory_mb"] > 0 and c["n_waves"] == 2

    # The submission is incomplete (two empty texts): the validator says so.
    assert main(["validate-submission", str(out / "submission.csv"), str(test_list)]) == 1
    assert capsys.readouterr().out.count("has an empty text") == 2

    # The ASR task of the same list (the sound world has no speech: this checks the plumbing, not a model).
    assert main(["eval-alm", "--config", str(cfg_path), "--test-list", str(test_list), "--task", "asr",
                 "--out", str(tmp_path / "asr"), "--set", "eval_alm.cost.enabled=false",
                 "--set", "eval_alm.long_audio=join"]) == 0
    ev = json.loads((tmp_path / "asr" / "eval.json").read_text())
    assert ev["counts"]["evaluated"] == 1 and ev["counts"]["skipped_other_task"] == 5
    assert 0 <= ev["quality"]["wer"] and ev["cost"] == {"skipped": "eval_alm.cost.enabled is false"}

    # A test list that is not JSON: one message, exit 2, before any model loads.
    bad = _write(tmp_path / "bad.json", "{")
    assert main(["eval-alm", "--config", str(cfg_path), "--test-list", str(bad), "--task", "asr",
                 "--out", str(tmp_path / "x")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
