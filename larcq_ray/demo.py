"""`larcq-ray demo`: the whole pipeline, offline, in a few minutes.

It writes a synthetic LARCQ benchmark (long audios of distinct synthetic sound events, queries
naming them), builds a tiny CLAP and a tiny Qwen2-Audio captioner with random weights (no hub
access here), writes the config it used, and runs index -> search -> caption -> rerank (the
/rerank Serve app with the real MiniLM bi-encoder) -> evaluate on a local Ray. Retrieval and
caption figures are at chance level (random weights): the report says so.
"""

from __future__ import annotations

import csv
import logging
import socket
from pathlib import Path

import yaml

from larcq_ray.demo_benchmark import DemoBenchmarkSpec, write_demo_benchmark
from larcq_ray.synth_events import EVENT_KINDS

log = logging.getLogger("larcq_ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(out: Path, address: str | None = None) -> dict:
    return {
        "run_dir": str(out / "run"),
        "data": {"benchmark": str(out / "benchmark")},
        "model": {"name_or_path": str(out / "model"), "device": "cpu"},
        "index": {
            "chunking": {"mode": "fixed", "window_s": 10.0, "overlap_s": 0.0, "min_chunk_s": 1.0},
            "whole_file": True,
            "batch_size": 8,
            "num_actors": 1,
            "files_per_decode_task": 2,
            "commit_every_files": 8,
        },
        "search": {"query_chunking": "columns", "top_k": 10},
        "caption": {"backend": {"model": str(out / "alm"), "device": "cpu", "max_new_tokens": 12}},
        "rerank": {"mode": "audio-max+query-sum", "top_n": 5},
        "serve": {"port": _free_port(), "backend": {"kind": "bi-encoder", "device": "cpu"}},
        "ray": {"address": address},
    }


def texts_for_models(bench: Path) -> list[str]:
    """What the tiny models' tokenizers are trained on: the benchmark's text and every caption."""
    with open(bench / "queries.csv", newline="") as f:
        texts = [cell for row in csv.reader(f) for cell in row]
    return texts + [c for kind in EVENT_KINDS for c in kind.captions]


def prepare_demo(out: Path, n_audios: int = 16, seed: int = 0, address: str | None = None) -> Path:
    """Write the demo's inputs under `out` (benchmark, tiny CLAP, tiny captioner, config.yaml with
    absolute paths) without running anything; returns the config's path. Existing inputs are kept."""
    from larcq_ray.caption.tiny_alm import build_tiny_qwen2_audio
    from larcq_ray.tiny_clap import build_tiny_clap

    out = Path(out).resolve()  # absolute: the config must work from a Ray job's working dir too
    out.mkdir(parents=True, exist_ok=True)
    bench = out / "benchmark"
    if not (bench / "queries.csv").exists():
        log.info("writing a synthetic benchmark of %d long audios to %s", n_audios, bench)
        write_demo_benchmark(bench, DemoBenchmarkSpec(n_audios=n_audios, seed=seed))
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        log.info("building a tiny CLAP (random weights, BPE trained on the captions) in %s", model_dir)
        build_tiny_clap(model_dir, texts_for_models(bench), seed=seed)
    alm_dir = out / "alm"
    if not (alm_dir / "config.json").exists():
        log.info("building a tiny Qwen2-Audio captioner (random weights) in %s", alm_dir)
        build_tiny_qwen2_audio(alm_dir, texts_for_models(bench), seed=seed)
    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_config(out, address), sort_keys=False))
    return cfg_path


def run_demo(out: Path, n_audios: int = 16, seed: int = 0, address: str | None = None) -> dict:
    from larcq_ray.cli import run_command
    from larcq_ray.config import load_config

    cfg_path = prepare_demo(out, n_audios, seed, address)
    cfg = load_config(cfg_path)
    run_command("run", cfg)  # index -> search -> caption -> rerank -> evaluate
    log.info("note: the demo's CLAP and captioner have random weights (nothing can be downloaded here), so "
             "retrieval is at chance level (R@1 = %.1f%% for %d audios) and the captions are gibberish that the "
             "(real, trained) MiniLM re-ranker cannot use: the figures show the pipeline runs, not the method's "
             "quality", 100.0 / n_audios, n_audios)
    log.info("demo done: config %s, report %s", cfg_path, Path(cfg.run_dir) / "report.md")
    return {"config": cfg_path, "run_dir": Path(cfg.run_dir)}
