"""The full benchmark run (`larcq-ray benchmark`): synthesize -> refine -> index -> search -> caption
-> rerank -> evaluate from one config, on tiny offline models."""

from __future__ import annotations

import csv
import json
import socket

import yaml

from larcq_ray.cli import main
from larcq_ray.refine.prompts import DEFAULT_PROMPTS

from conftest import CAPTIONS
from test_synthesis import _clotho_source


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_benchmark_command_runs_every_stage(ray_session, tiny_clap, tmp_path):
    from larcq_ray.offline.tiny_alm import build_tiny_qwen2_audio
    from larcq_ray.offline.tiny_lm import build_tiny_causal_lm

    csv_path, audio = _clotho_source(tmp_path / "clotho")
    lm = build_tiny_causal_lm(tmp_path / "lm", CAPTIONS * 5 + list(DEFAULT_PROMPTS.values()), seed=0)
    alm = build_tiny_qwen2_audio(tmp_path / "alm", CAPTIONS * 20, seed=0)
    bench = str(tmp_path / "bench")
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "synthesize": {"captions_csv": str(csv_path), "audio_dir": str(audio), "out_dir": bench, "n_audios": 4,
                       "clips_per_audio": 2, "seed": 5},
        "refine": {"mode": "condense", "model": str(lm), "device": "cpu", "max_new_tokens": 8, "batch_size": 4},
        "data": {"benchmark": bench},
        "model": {"name_or_path": str(tiny_clap), "device": "cpu", "local_files_only": True},
        "index": {"batch_size": 4, "num_actors": 1},
        "search": {"top_k": 4},
        "caption": {"backend": {"model": str(alm), "device": "cpu", "max_new_tokens": 4, "local_files_only": True}},
        "rerank": {"top_n": 2},
        "serve": {"port": _free_port(), "backend": {"kind": "bi-encoder", "device": "cpu"}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["benchmark", "--config", str(tmp_path / "c.yaml")]) == 0

    with open(tmp_path / "bench" / "queries_condensed.csv", newline="") as f:
        refined = list(csv.DictReader(f))
    with open(tmp_path / "bench" / "queries.csv", newline="") as f:
        raw = list(csv.DictReader(f))
    assert [r["audio_id"] for r in refined] == [r["audio_id"] for r in raw] and len(raw) == 4
    # A random tiny LM cannot keep the events: every rewrite is flagged and the raw query kept.
    assert [r["query"] for r in refined] == [r["query"] for r in raw]
    run = tmp_path / "run"
    for name in ("config.yaml", "shortlist.parquet", "captions.parquet", "reranked.parquet", "metrics.json"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["top_n"] == 2 and "R@1" in metrics["audio-max+query-sum"]
    search_meta = json.loads((run / "search_meta.json").read_text())
    assert search_meta["n_queries"] == 4
