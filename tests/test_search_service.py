"""The /search Serve app over real HTTP: a plain corpus of long audios with events at known times,
indexed once with the demo CLAP, served on 127.0.0.1:<free port> (one app without auth, one with
an API key), queried with httpx; the apps are deleted at the end so other Serve tests start clean."""

from __future__ import annotations

import socket

import httpx
import numpy as np
import pytest
import soundfile as sf
import yaml

SR = 48000
EVENT_S = 4.0
CORPUS = {
    "a.wav": ["siren", "heartbeat", "white_noise", "bell"],
    "b.wav": ["knocks", "low_rumble", "major_chord"],
}
QUERY = "a heart pounds slowly and loudly and then a loud radio static hiss"  # a.wav, 4-8 s then 8-12 s
API_KEY = "search-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory, ray_session):
    from ray import serve

    from larcq_ray.cli import main
    from larcq_ray.config import load_config
    from larcq_ray.offline import sound_world as sw
    from larcq_ray.offline.demo_clap import assemble_demo_clap
    from larcq_ray.search.app import run_server

    root = tmp_path_factory.mktemp("search_service")
    model = assemble_demo_clap(root / "demo_clap")
    rng = np.random.default_rng(20240613)
    for aid, kinds in CORPUS.items():
        audio = np.concatenate([sw.render(sw.EventSpec(k, {"loudness": "loud"}), rng, EVENT_S, SR) for k in kinds])
        (root / "corpus").mkdir(exist_ok=True)
        sf.write(root / "corpus" / aid, audio, SR)
    port = _free_port()
    cfg = {
        "run_dir": str(root / "run"),
        "data": {"corpus": str(root / "corpus")},
        "model": {"name_or_path": str(model), "device": "cpu", "local_files_only": True},
        "index": {"chunking": {"mode": "fixed", "window_s": EVENT_S, "overlap_s": 0.0, "min_chunk_s": 1.0},
                  "whole_file": True, "batch_size": 8},
        "search": {"query_chunking": "joins",
                   "serve": {"port": port, "num_cpus": 0.5, "max_body_bytes": 2000, "max_top_k": 5,
                             "default_top_k": 5}},
    }
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["index", "--config", str(cfg_path)]) == 0
    open_cfg = load_config(str(cfg_path))
    secure_cfg = load_config(str(cfg_path), [f"search.serve.api_key={API_KEY}", "search.serve.route_prefix=/secure"])
    assert open_cfg.search.serve.api_key is None  # $LARCQ_SEARCH_API_KEY unset: no auth
    try:
        url = run_server(open_cfg, blocking=False, app_name="search-open")
        run_server(secure_cfg, blocking=False, app_name="search-secure")
        yield url
    finally:
        for name in ("search-open", "search-secure"):
            try:
                serve.delete(name)
            except Exception:  # noqa: BLE001 - never started
                pass
        serve.shutdown()  # Serve's HTTP port is fixed at its first start: later modules start their own


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service, timeout=120) as c:
        yield c


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["n_audios"] == 2 and "audio-max+query-sum" in body["modes"]


def test_query_finds_its_audio_and_the_matched_windows(client):
    r = client.post("/search", json={"query": QUERY, "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "audio-max+query-sum"
    assert body["chunks"] == ["a heart pounds slowly and loudly", "a loud radio static hiss"]
    assert [x["audio_id"] for x in body["results"]][0] == "a.wav" and len(body["results"]) == 2
    scores = [x["score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True)
    windows = body["results"][0]["windows"]
    assert [(w["chunk"], w["start_s"], w["end_s"]) for w in windows] == [(0, 4.0, 8.0), (1, 8.0, 12.0)]
    assert windows[0]["text"] == "a heart pounds slowly and loudly" and -1 <= windows[0]["similarity"] <= 1


def test_modes_and_top_k(client):
    r = client.post("/search", json={"query": QUERY, "mode": "audio-max", "top_k": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "audio-max" and len(body["results"]) == 1
    assert [w["chunk"] for w in body["results"][0]["windows"]] == [-1]  # the whole query's window
    whole = client.post("/search", json={"query": QUERY, "mode": "none"}).json()
    assert [x["windows"] for x in whole["results"]] == [[], []]  # whole-file scores: no window; k clamped to 2


@pytest.mark.parametrize("payload,field", [
    ({"query": "   "}, "query"),
    ({"query": QUERY, "mode": "loudest"}, "mode"),
    ({"query": QUERY, "top_k": 0}, "top_k"),
    ({"query": QUERY, "top_k": 6}, "top_k"),  # over search.serve.max_top_k
    ({"query": QUERY, "top_k": "3"}, "top_k"),
    ({"query": QUERY, "rerank": True}, "rerank"),  # not offered yet: refused, not ignored
    ({}, "query"),
])
def test_bad_requests_are_422_with_the_rerank_error_shape(client, payload, field):
    r = client.post("/search", json=payload)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["field"] == field and err["message"]


def test_not_json_is_400_and_too_large_is_413(client):
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"
    r = client.post("/search", json={"query": "rain " * 1000})
    assert r.status_code == 413, r.text
    assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "payload_too_large", "field": "body"}


def test_api_key(client):
    assert client.post("/secure/search", json={"query": QUERY}).status_code == 401
    r = client.post("/secure/search", json={"query": QUERY}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers.get("www-authenticate") == "Bearer"
    ok = client.post("/secure/search", json={"query": QUERY}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json()["results"][0]["audio_id"] == "a.wav"
    assert client.get("/secure/healthz").status_code == 200  # probes need no key
