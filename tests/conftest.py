"""Shared fixtures: one local Ray session and one tiny offline CLAP per test run."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CAPTIONS = [
    "a dog barks loudly", "rain falls on a tin roof", "a car passes by on a wet street",
    "a high tone rings", "a low hum drones", "birds chirp in the morning", "a door creaks open",
    "white noise hisses", "a bell rings twice", "footsteps on gravel",
]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from larcq_ray.core.ray_session import _quiet_ray_data

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    _quiet_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_clap(tmp_path_factory) -> Path:
    from larcq_ray.offline.tiny_clap import build_tiny_clap

    return build_tiny_clap(tmp_path_factory.mktemp("tiny_clap"), CAPTIONS * 20, fusion=True, seed=0)


@pytest.fixture(scope="session")
def tiny_clap_unfused(tmp_path_factory) -> Path:
    from larcq_ray.offline.tiny_clap import build_tiny_clap

    return build_tiny_clap(tmp_path_factory.mktemp("tiny_clap_unfused"), CAPTIONS * 20, fusion=False, seed=1)


def tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write_bad_audio(folder: Path) -> dict[str, str]:
    """One file per kind of bad input; returns audio_id -> expected error kind ("" = indexed)."""
    folder.mkdir(parents=True, exist_ok=True)
    expect = {}
    sf.write(folder / "good.wav", tone(3.0, 48000), 48000)
    expect["good.wav"] = ""
    (folder / "empty.wav").write_bytes(b"")
    expect["empty.wav"] = "empty"
    (folder / "not_audio.wav").write_text("this is a text file, not audio\n" * 10)
    expect["not_audio.wav"] = "unreadable"
    sf.write(folder / "zero_frames.wav", np.zeros(0, dtype=np.float32), 48000)
    expect["zero_frames.wav"] = "empty"
    sf.write(folder / "silent.wav", np.zeros(48000, dtype=np.float32), 48000)
    expect["silent.wav"] = ""  # silence is valid audio: indexed, with a warning
    nan = tone(1.0, 48000)
    nan[100:110] = np.nan
    sf.write(folder / "nan.wav", nan, 48000, subtype="FLOAT")
    expect["nan.wav"] = "invalid samples"
    sf.write(folder / "stereo.flac", tone(2.0, 44100, channels=2), 44100)
    expect["stereo.flac"] = ""  # indexed, with a downmix warning
    sf.write(folder / "odd_rate.wav", tone(2.0, 7350, freq=300), 7350)
    expect["odd_rate.wav"] = ""  # indexed, resampled, with a low-rate warning
    full = folder / "_full.flac"
    sf.write(full, tone(4.0, 48000), 48000)
    data = full.read_bytes()
    (folder / "truncated.flac").write_bytes(data[: len(data) // 2])
    full.unlink()
    expect["truncated.flac"] = "truncated or corrupt"
    sf.write(folder / "_full.wav", tone(2.0, 48000), 48000, subtype="PCM_16")
    data = (folder / "_full.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(data[: len(data) // 2])
    (folder / "_full.wav").unlink()
    expect["truncated.wav"] = ""  # the readable half is indexed, with a truncation warning
    return expect


# -- the /search service: one indexed corpus per run, one Serve instance per module that uses it ----
SEARCH_EVENT_S = 4.0
SEARCH_CORPUS = {  # long audios, one sound-world event every 4 s
    "a.wav": ["siren", "heartbeat", "white_noise", "bell"],
    "b.wav": ["knocks", "low_rumble", "major_chord"],
}
SEARCH_QUERY = "a heart pounds slowly and loudly and then a loud radio static hiss"  # a.wav: 4-8 s then 8-12 s
SEARCH_API_KEY = "search-test-key"
# Stored captions that contradict CLAP: b.wav's windows describe the query, a.wav's do not. With
# `rerank: true` (fusion: rerank, the paper) b.wav comes first; without it a.wav does.
SEARCH_CAPTIONS = {
    "a.wav": ["a church bell rings", "a choir sings", "wind blows", "a door closes"],
    "b.wav": ["a heart pounds slowly and loudly", "a loud radio static hiss", "a car passes"],
}


def _write_search_captions(path: Path, audio_ids) -> None:
    from larcq_ray import artifacts

    rows = []
    for aid in audio_ids:
        texts = SEARCH_CAPTIONS[aid]
        for i, text in enumerate(texts):
            rows.append({"audio_id": aid, "chunk_index": i, "start_s": i * SEARCH_EVENT_S,
                         "end_s": (i + 1) * SEARCH_EVENT_S, "captioner": "hand", "prompt": "", "caption": text,
                         "status": "ok", "error": None})
        rows.append({"audio_id": aid, "chunk_index": -1, "start_s": 0.0, "end_s": len(texts) * SEARCH_EVENT_S,
                     "captioner": "hand", "prompt": "", "caption": ". ".join(texts), "status": "ok", "error": None})
    artifacts.CAPTIONS.write_to(path, rows)


@pytest.fixture(scope="session")
def search_corpus(tmp_path_factory, ray_session):
    """A plain corpus with events at known times, indexed once with the demo CLAP; run_dir holds
    captions of both audios, b_only.parquet those of b.wav alone. Yields (root, config dict)."""
    import yaml

    from larcq_ray.cli import main
    from larcq_ray.offline import sound_world as sw
    from larcq_ray.offline.demo_clap import assemble_demo_clap

    sr = 48000
    root = tmp_path_factory.mktemp("search_corpus")
    model = assemble_demo_clap(root / "demo_clap")
    rng = np.random.default_rng(20240613)
    (root / "corpus").mkdir()
    for aid, kinds in SEARCH_CORPUS.items():
        audio = np.concatenate([sw.render(sw.EventSpec(k, {"loudness": "loud"}), rng, SEARCH_EVENT_S, sr)
                                for k in kinds])
        sf.write(root / "corpus" / aid, audio, sr)
    cfg = {
        "run_dir": str(root / "run"),
        "data": {"corpus": str(root / "corpus")},
        "model": {"name_or_path": str(model), "device": "cpu", "local_files_only": True},
        "index": {"chunking": {"mode": "fixed", "window_s": SEARCH_EVENT_S, "overlap_s": 0.0, "min_chunk_s": 1.0},
                  "whole_file": True, "batch_size": 8},
        "rerank": {"fusion": "rerank", "match": "windows"},
        # 3 search replicas + 1 rerank replica fit in the test session's 2 CPUs (an app that cannot be placed waits forever)
        "serve": {"route_prefix": "/rr", "search": True, "num_cpus": 0.5,
                  "backend": {"kind": "bi-encoder", "device": "cpu"}},
        "search": {"query_chunking": "joins",
                   "serve": {"num_cpus": 0.3, "max_body_bytes": 2000, "max_top_k": 5, "default_top_k": 5}},
    }
    (root / "index.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["index", "--config", str(root / "index.yaml")]) == 0
    _write_search_captions(root / "run" / "captions.parquet", ["a.wav", "b.wav"])
    _write_search_captions(root / "b_only.parquet", ["b.wav"])
    return root, cfg


@pytest.fixture(scope="module")
def search_service(search_corpus, tmp_path_factory):
    """What `larcq-ray serve --search` starts, on 127.0.0.1:<free port>: /rerank (MiniLM) under /rr
    and /search at /, plus a second search app under /secure with SEARCH_API_KEY whose captions
    cover b.wav only, and a third under /lone whose rerank.endpoint names a missing app. Yields the base URL; the apps and Serve are gone afterwards, so the next
    module's Serve starts on its own port."""
    import socket

    import yaml
    from ray import serve

    from larcq_ray.config import load_config
    from larcq_ray.core.serve_runner import start_apps
    from larcq_ray.rerank.app import rerank_app
    from larcq_ray.search.app import run_server, search_app

    root, cfg = search_corpus
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {**cfg, "serve": {**cfg["serve"], "port": port},
           "search": {**cfg["search"], "serve": {**cfg["search"]["serve"], "port": port}}}
    path = tmp_path_factory.mktemp("search_service") / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    open_cfg = load_config(str(path))
    secure_cfg = load_config(str(path), [f"search.serve.api_key={SEARCH_API_KEY}", "search.serve.route_prefix=/secure",
                                         f"search.serve.captions={root / 'b_only.parquet'}"])
    assert open_cfg.search.serve.api_key is None  # $LARCQ_SEARCH_API_KEY unset: no auth
    try:
        base = start_apps([rerank_app(open_cfg.serve), search_app(open_cfg, "search-open")], "127.0.0.1", port)
        run_server(secure_cfg, blocking=False, app_name="search-secure")
        lone_cfg = load_config(str(path), ["search.serve.route_prefix=/lone", "rerank.endpoint=serve://no-such-app"])
        run_server(lone_cfg, blocking=False, app_name="search-lone")  # its re-rank service is missing
        yield base
    finally:
        for name in ("search-open", "search-secure", "search-lone", "larcq-rerank"):
            try:
                serve.delete(name)
            except Exception:  # noqa: BLE001 - never started
                pass
        serve.shutdown()  # Serve's HTTP port is fixed at its first start: later modules start their own


def fuzz_openapi(base_url: str, max_examples: int, headers: dict | None = None) -> list[str]:
    """Schemathesis over every operation of the app's OpenAPI schema at base_url (valid and invalid
    requests); fails on any 5xx. Returns the operations fuzzed. (Driven through Hypothesis here:
    schemathesis' pytest plugin does not run under pytest 9.)"""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    done = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def fuzz(case):
            case.call_and_validate(base_url=base_url, headers=headers, checks=[not_a_server_error])

        fuzz()
        done.append(f"{operation.method.upper()} {operation.path}")
    return done


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """Base URI of a fresh bucket; credentials ride in the URI so Ray workers need no env."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://k:s@larcq/x?{query}&allow_bucket_creation=true")
    fs.create_dir("larcq")
    yield lambda key: f"s3://k:s@larcq/{key}?{query}"
    server.stop()
