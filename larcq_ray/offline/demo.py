"""`larcq-ray demo`: the whole pipeline, offline, in a few minutes.

It writes one-event clips of the project's sound world (`sound_world`, captions from the HELD-OUT
phrasings only), assembles the demo CLAP trained on that world (`demo_clap`: committed weights +
all-MiniLM-L6-v2) and the demo captioner trained on it (`demo_captioner`: a prefix-lm on the demo
CLAP's audio tower, TRAINING phrasings only), writes the config it used, and runs synthesize (long
audios of 3-5 clips, multi-event queries) -> index -> search -> caption (every 2.5 s window of the
shortlisted audios) -> rerank (the /rerank Serve app with the real MiniLM bi-encoder comparing the
query's chunks with the window captions) -> evaluate on a local Ray. Every figure is real.

The re-rank settings (RERANK) were chosen on a validation benchmark rendered with other seeds by
`benchmarks/bench_caption_rerank.py`, never on the demo's own audios.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import yaml

from larcq_ray.offline import sound_world
from larcq_ray.core.errors import LarcqError

log = logging.getLogger("larcq_ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLIP_SECONDS = (2.0, 5.0)
CLIPS_PER_AUDIO = (3, 5)
SAMPLE_RATE = 48000
WINDOW_S = 5.0  # index chunks about one event long (events are 2-5 s)
CAPTION_WINDOW_S = 2.5  # caption windows mostly inside one event (the captioner learned one-event clips)
# Chosen on the validation benchmark of benchmarks/bench_caption_rerank.py (seed 1, 200 audios).
RERANK = {"mode": "audio-max+query-sum", "top_n": 5, "match": "windows", "query_vote": "sum",
          "fusion": "weighted", "clap_weight": 0.2}


def demo_config(out: Path, n_audios: int, seed: int, address: str | None = None,
                rerank: dict | None = None) -> dict:
    clips = out / "clips"
    return {
        "run_dir": str(out / "run"),
        "stages": ["synthesize", "index", "search", "caption", "rerank", "evaluate"],
        "synthesize": {"captions_csv": str(clips / "captions.csv"), "audio_dir": str(clips / "audio"),
                       "out_dir": str(out / "benchmark"), "n_audios": n_audios,
                       "clips_per_audio": list(CLIPS_PER_AUDIO), "seed": seed, "gap_s": 0.5,
                       "max_clip_uses": 1, "query_caption": "random"},
        "data": {"benchmark": str(out / "benchmark")},
        "model": {"name_or_path": str(out / "model"), "device": "cpu", "local_files_only": True},
        "index": {
            "chunking": {"mode": "fixed", "window_s": WINDOW_S, "overlap_s": 0.0, "min_chunk_s": 1.0},
            "whole_file": True,
            "batch_size": 8,
            "num_actors": 1,
            "files_per_decode_task": 2,
            "commit_every_files": 8,
        },
        "search": {"query_chunking": "columns", "top_k": 10},
        "caption": {"backend": {"kind": "prefix-lm", "model": str(out / "captioner"), "device": "cpu",
                                "window_s": CAPTION_WINDOW_S, "max_new_tokens": 32, "batch_size": 16,
                                "local_files_only": True}},
        "rerank": {**RERANK, **(rerank or {})},
        "serve": {"port": _free_port(), "backend": {"kind": "bi-encoder", "device": "cpu"}},
        "ray": {"address": address},
    }


def prepare_demo(out: Path, n_audios: int = 16, seed: int = 0, address: str | None = None,
                 rerank: dict | None = None) -> Path:
    """Write the demo's inputs under `out` (held-out clips, the demo CLAP, the demo captioner,
    config.yaml with absolute paths) without running anything; returns the config's path. Existing
    inputs are kept. The long-audio benchmark is synthesized by the run's first stage."""
    from larcq_ray.offline.demo_captioner import assemble_demo_captioner
    from larcq_ray.offline.demo_clap import assemble_demo_clap

    if n_audios < 1:
        raise LarcqError(f"the demo needs at least one long audio, got {n_audios}")
    out = Path(out).resolve()  # absolute: the config must work from a Ray job's working dir too
    out.mkdir(parents=True, exist_ok=True)
    clips = out / "clips"
    if not (clips / "captions.csv").exists():
        n_clips = n_audios * CLIPS_PER_AUDIO[1] + 8  # max_clip_uses 1: enough for the longest draw
        log.info("writing %d sound-world clips (held-out phrasings) to %s", n_clips, clips)
        sound_world.write_clip_dataset(clips, n_clips, seed=seed + 1000, sample_rate=SAMPLE_RATE,
                                       duration_s=CLIP_SECONDS, split="heldout")
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        log.info("assembling the demo CLAP (trained on sound_world; text tower all-MiniLM-L6-v2) in %s", model_dir)
        assemble_demo_clap(model_dir)
    captioner_dir = out / "captioner"
    if not (captioner_dir / "captioner.json").exists():
        log.info("assembling the demo captioner (trained on sound_world's training phrasings) in %s", captioner_dir)
        assemble_demo_captioner(captioner_dir, model_dir)
    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_config(out, n_audios, seed, address, rerank), sort_keys=False))
    return cfg_path


def run_demo(out: Path, n_audios: int = 16, seed: int = 0, address: str | None = None) -> dict:
    from larcq_ray.config import load_config
    from larcq_ray.pipeline import run_command

    cfg_path = prepare_demo(out, n_audios, seed, address)
    cfg = load_config(cfg_path)
    run_command("run", cfg)  # synthesize -> index -> search -> caption -> rerank -> evaluate
    log.info("note: the demo's CLAP and captioner are trained on the project's synthetic sound world; the queries "
             "use phrasings neither saw in training (chance R@1 = %.1f%% for %d audios)", 100.0 / n_audios, n_audios)
    log.info("demo done: config %s, report %s", cfg_path, Path(cfg.run_dir) / "report.md")
    return {"config": cfg_path, "run_dir": Path(cfg.run_dir)}
