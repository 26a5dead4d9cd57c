"""The /search Serve app over real HTTP, beside a real /rerank app (MiniLM bi-encoder) as `larcq-ray
serve --search` runs them: the corpus, captions and apps are conftest's `search_corpus` and
`search_service` (events at known times, indexed with the demo CLAP; one search app without auth,
one with an API key and captions for b.wav only), queried with httpx."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from conftest import SEARCH_API_KEY as API_KEY
from conftest import fuzz_openapi
from conftest import SEARCH_QUERY as QUERY


@pytest.fixture(scope="module")
def client(search_service):
    with httpx.Client(base_url=search_service, timeout=120) as c:
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
    ({"query": QUERY, "rerank": "yes"}, "rerank"),
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


def test_rerank_reorders_from_stored_captions(client):
    plain = client.post("/search", json={"query": QUERY}).json()
    assert [x["audio_id"] for x in plain["results"]] == ["a.wav", "b.wav"] and not plain["reranked"]
    r = client.post("/search", json={"query": QUERY, "rerank": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reranked"] and body["uncaptioned"] == []
    first, second = body["results"]
    assert (first["audio_id"], first["rank"], first["clap_rank"]) == ("b.wav", 1, 2)
    assert second["clap_rank"] == 1 and first["rerank_score"] > second["rerank_score"]
    assert first["clap_score"] == pytest.approx(plain["results"][1]["score"], rel=1e-5)
    assert first["windows"] == plain["results"][1]["windows"]  # the matched windows travel with their audio
    assert first["audio_url"] == "/audio/b.wav"


def test_rerank_says_which_results_had_no_caption(client):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = client.post("/secure/search", json={"query": QUERY, "rerank": True}, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["uncaptioned"] == ["a.wav"]
    a = next(x for x in body["results"] if x["audio_id"] == "a.wav")
    assert a["rerank_score"] is None and a["note"].startswith("no caption")
    b = next(x for x in body["results"] if x["audio_id"] == "b.wav")
    assert b["rerank_score"] is not None and b["note"] == ""
    assert b["audio_url"].startswith("/secure/audio/b.wav?token=")


def test_rerank_without_a_rerank_service_is_503_and_search_still_works(client):
    r = client.post("/lone/search", json={"query": QUERY, "rerank": True})
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["type"] == "unavailable" and err["field"] == "rerank" and "no-such-app" in err["message"]
    assert client.post("/lone/search", json={"query": QUERY}).status_code == 200


def test_both_apps_answer_on_one_port(client):
    r = client.post("/rr/rerank", json={"query": "rain", "documents": ["rain falls", "a dog barks"]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["index"] == 0
    assert client.get("/healthz").json()["auth_required"] is False
    assert client.get("/secure/healthz").json()["auth_required"] is True


def test_serve_search_flag_and_prefix_clash(tmp_path):
    from larcq_ray.cli import _config, build_parser
    from larcq_ray.core.errors import LarcqError
    from larcq_ray.core.serve_runner import ServeApp, start_apps

    args = build_parser().parse_args(["serve", "--config", str(tmp_path / "none.yaml"), "--search"])
    (tmp_path / "none.yaml").write_text("run_dir: x\n")
    assert _config(args).serve.search is True
    apps = [ServeApp("a", None, "/", "rerank", "/rerank"), ServeApp("b", None, "/", "search", "/")]
    with pytest.raises(LarcqError, match="route prefixes"):
        start_apps(apps, "127.0.0.1", 1)

    from larcq_ray.config import PipelineConfig
    from larcq_ray.search.app import check_index

    with pytest.raises(LarcqError, match="no index in"):
        check_index(PipelineConfig(run_dir=str(tmp_path / "nothing")))


def test_the_search_engine_reads_an_index_and_captions_on_s3_in_place(search_corpus, s3, tmp_path):
    """A run_dir on an object store: the replica reads the index (and the stored captions) there, with
    no local copy, and ranks as it does from the local run_dir."""
    import pyarrow.fs as pafs
    import yaml

    from larcq_ray.config import load_config
    from larcq_ray.core.errors import LarcqError
    from larcq_ray.search.app import check_index
    from larcq_ray.search.router import SearchEngine

    root, cfg = search_corpus
    uri = s3("runs/search")
    fs, base = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(root / "run" / "index"), base + "/index", destination_filesystem=fs)
    pafs.copy_files(str(root / "run" / "captions.parquet"), base + "/captions.parquet", destination_filesystem=fs)
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "s3.yaml").write_text(yaml.safe_dump({**cfg, "run_dir": uri}))
    remote_cfg = load_config(str(tmp_path / "s3.yaml"))
    check_index(remote_cfg)
    local, remote = SearchEngine(load_config(str(tmp_path / "local.yaml"))), SearchEngine(remote_cfg)
    assert remote.store.uri.startswith("s3://") and remote.n_audios == local.n_audios == 2
    assert remote.captions is not None and remote.captions == local.captions
    for mode in ("audio-max+query-sum", "none"):
        r, want = remote.search(QUERY, 2, mode), local.search(QUERY, 2, mode)
        assert [x.audio_id for x in r.results] == [x.audio_id for x in want.results]
        np.testing.assert_allclose([x.score for x in r.results], [x.score for x in want.results], atol=1e-6)
    (tmp_path / "none.yaml").write_text(yaml.safe_dump({**cfg, "run_dir": s3("runs/none")}))
    with pytest.raises(LarcqError, match="no index in"):
        check_index(load_config(str(tmp_path / "none.yaml")))


def test_audio_is_served_only_for_indexed_recordings(client):
    for path in ("/audio/c.wav", "/audio/..%2Fb_only.parquet", "/audio/%2Fetc%2Fpasswd"):
        r = client.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert r.json()["error"]["type"] == "not_found_error"
    assert client.get("/audio/b.wav", headers={"Range": "bytes=0-3"}).content == b"RIFF"


def test_audio_tokens_expire_and_name_one_recording():
    from larcq_ray.search import audio_tokens

    t = audio_tokens.sign("k", "a.wav", ttl_s=60, now=1000.0)
    assert audio_tokens.check("k", "a.wav", t, now=1059.0) is None
    assert "expired" in audio_tokens.check("k", "a.wav", t, now=1061.0)
    assert "invalid" in audio_tokens.check("k", "b.wav", t, now=1001.0)
    assert "invalid" in audio_tokens.check("other key", "a.wav", t, now=1001.0)
    assert "malformed" in audio_tokens.check("k", "a.wav", "abc", now=1001.0)


def test_fuzzed_requests_never_get_a_5xx(search_service):
    done = fuzz_openapi(search_service, max_examples=15)
    assert {"POST /search", "GET /healthz", "GET /audio/{audio_id}"} <= set(done), done
    r = httpx.post(search_service + "/search", content=b"[" * 900 + b"]" * 900, timeout=60)  # under the body limit
    assert r.status_code == 400 and "deeper than" in r.json()["error"]["message"]
