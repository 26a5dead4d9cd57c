"""benchmarks/device_check.sh, the GPU machine's prepared script, as a CPU dry run (`--cpu --tiny`):
every section runs (tiny dims) with `import ray` blocked as on the GPU machine, writes its JSON line
with a throughput and its CPU-match figures, and the markdown table is written."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
SECTIONS = ["env", "clap_htsat", "cross_encoder", "listwise_lm", "qwen2_audio_7b", "af3_7b", "prefix_lm_7b",
            "prefix_lm_1b_cost"]
MATCHED = {"clap_htsat", "cross_encoder", "listwise_lm", "qwen2_audio_7b", "af3_7b", "prefix_lm_7b"}


def _helper():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _lines(out: Path) -> dict[str, dict]:
    recs = [json.loads(line) for line in (out / "device_check.jsonl").read_text().splitlines() if line.strip()]
    return {r["section"]: r for r in recs}


def test_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_CHECK_")}
    # The repo root on PYTHONPATH is the script's own job: it must not rely on an installed larcq_ray.
    env.update(OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", "--tiny"], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    recs = _lines(out)
    assert list(recs) == SECTIONS, log[-4000:]
    has_af3 = hasattr(transformers, "AudioFlamingo3ForConditionalGeneration")
    for name, r in recs.items():
        if name == "af3_7b" and not has_af3:
            assert r["status"] == "skipped" and "AudioFlamingo3" in r["reason"]
            continue
        assert r["status"] == "ok", (name, r.get("reason"), r.get("traceback_tail"))
        assert r["mode"] == "dry-run"
        assert r["ray_imported"] is False  # a CPU dry run never imports Ray
        figs = r["figures"]
        if name in MATCHED:  # the path's output vs its CPU float32 result (bf16 on CPU here)
            assert figs["match_ok"] is True and figs["bf16_min_cosine"] >= 0.99, (name, figs)
            assert "fp32_max_abs_diff" not in figs  # CPU only: no device float32 to compare
        if name == "env":
            assert figs["versions"]["torch"] and figs["versions"]["transformers"]
            assert figs["missing_packages"] == [] and figs["bf16_supported"] is False
            assert figs["ray_importable"] is False  # the script's blocker, as on the GPU machine
            continue
        if name == "clap_htsat":
            assert figs["chunks_per_s"] > 0 and figs["encoder_only_chunks_per_s"] > 0 and figs["fusion"] is True
            assert figs["features"].startswith("larcq_ray.models.clap_features")  # torch features, not precomputed
            assert 0.025 < figs["full_size_audio_params_b"] < 0.035  # HTSAT (CLAP's audio tower) + projection
            continue
        if name == "cross_encoder":
            assert figs["pairs_per_s"] > 0 and figs["path"].endswith("CrossEncoderBackend.score")
            continue
        if name == "listwise_lm":
            assert figs["candidates_per_s"] > 0 and figs["path"].endswith("TransformersListwiseBackend.score")
            assert 7.0 < figs["full_size_params_b"] < 8.0  # Qwen2.5-7B's shape
            continue
        if name == "prefix_lm_1b_cost":  # issue 12's cost table: seed 004's protocol
            c = figs["cost"]
            assert c["kind"] == "prefix-lm" and c["batch_size"] == 1 and c["timed_runs"] == 5
            assert c["ttft_ms_median"] > 0 and c["tpot_ms_median"] > 0 and c["peak_memory_mb"] > 0
            assert 1.0 < figs["full_size_decoder_params_b"] < 1.2  # TinyLlama-1.1B's shape
            continue
        assert figs["audio_s_per_s"] > 0 and figs["tokens_per_s"] > 0, figs
        assert figs["new_tokens_per_row"] == [32]  # forced: a random model's EOS cannot cut the work short
        assert figs["path"].startswith("larcq_ray.caption.")  # the product's code, not the direct fallback
        assert r["settings"] == {"window_s": 10.0, "batch": 8, "max_new_tokens": 32, "greedy": True,
                                 "timed_batches": 1}
    # The full-size configs are the 7B-class ones (counted on the meta device).
    assert 6.5 < recs["prefix_lm_7b"]["figures"]["full_size_decoder_params_b"] < 7.0
    assert 8.0 < recs["qwen2_audio_7b"]["figures"]["full_size_params_b"] < 9.0
    assert recs["qwen2_audio_7b"]["figures"]["cost"]["kind"] == "hf-audio-lm"
    assert recs["qwen2_audio_7b"]["figures"]["cost"]["ttft_ms_median"] > 0
    if has_af3:
        assert 7.5 < recs["af3_7b"]["figures"]["full_size_params_b"] < 9.0

    md = (out / "device_check.md").read_text()
    for name in SECTIONS:
        assert f"| {name} |" in md
    assert "10-s chunks/s" in md and "pairs/s" in md and "candidates/s" in md and "ok: bf16 cos" in md
    assert "| prefix_lm_1b_cost | cpu | float32 |" in md and "TTFT ms" in md  # the cost table
    assert (out / "device_check.log").is_file()


@pytest.mark.parametrize("flag", ["DEVICE_CHECK_DRY_RUN", "DEVICE_CHECK_CPU"])
def test_env_var_interface_and_the_ray_blocker(tmp_path, flag):
    """DEVICE_CHECK_DRY_RUN=1 still means --cpu --tiny (one process); DEVICE_CHECK_CPU=1 alone runs the
    GPU machine's loop (a process per section, under its cap), tiny on CPU; Ray cannot be imported."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_CHECK_")}
    env.update({flag: "1"}, DEVICE_CHECK_SECTIONS="env", OUT=str(out), PYTHON=sys.executable, TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT)], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    r = _lines(out)["env"]
    assert r["status"] == "ok" and r["mode"] == "dry-run" and r["figures"]["ray_importable"] is False
    log = (out / "device_check.log").read_text()
    if flag == "DEVICE_CHECK_DRY_RUN":
        assert "in one process" in log
    else:
        assert "section env (cap 15 s" in log and "in one process" not in log
    bad = subprocess.run(["bash", str(SCRIPT), "--gpu"], check=False, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --gpu" in bad.stderr


def test_killed_section_is_recorded_and_reported(tmp_path):
    dc = _helper()
    dc.write_line(tmp_path, {"section": "env", "status": "ok", "mode": "gpu",
                             "figures": {"gpu_name": "X", "versions": {}, "bf16_supported": True}})
    assert dc.finish_section("env", tmp_path, 0, 30) == 0  # a line already there: nothing added
    dc.finish_section("prefix_lm_7b", tmp_path, 124, 100)
    dc.skip_section("af3_7b", tmp_path, "out of the script's 295 s budget")
    recs = _lines(tmp_path)
    assert recs["prefix_lm_7b"]["status"] == "failed" and "timed out after 100 s" in recs["prefix_lm_7b"]["reason"]
    assert dc.report(tmp_path) == 1  # a failed section fails the script
    md = (tmp_path / "device_check.md").read_text()
    assert "| prefix_lm_7b | failed |" in md and "| qwen2_audio_7b | missing |" in md and "| af3_7b | skipped |" in md
