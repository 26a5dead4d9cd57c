"""The re-rank job end to end: CLI -> Serve app on 127.0.0.1 (real MiniLM bi-encoder) -> reranked.parquet
-> evaluation's `final` section. Captions are written by hand so the right answer is known."""

import json
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from larcq_ray.cli import main

QUERIES = {
    0: ("a dog barks, rain falls on a roof", ["a dog barks", "rain falls on a roof"], "dog_rain.wav"),
    1: ("a church bell rings, a car drives past", ["a church bell rings", "a car drives past"], "bell_car.wav"),
}
# Per audio: window captions (None: captioning failed)
CAPTIONS = {
    "dog_rain.wav": ["a dog is barking loudly", "heavy rain is falling on a roof"],
    "bell_car.wav": ["a bell rings in a church tower", "a car passes by on the road"],
    "piano.wav": ["someone plays a slow piano melody", "a piano chord fades out"],
    "birds.wav": ["birds chirp in a forest", "wind blows through trees"],
    "broken.wav": None,
}
# CLAP shortlists put the ground truth at rank 3 and 2, and the uncaptioned audio in the middle.
SHORTLIST = {0: ["piano.wav", "broken.wav", "dog_rain.wav", "birds.wav"],
             1: ["bell_car.wav", "piano.wav", "birds.wav", "broken.wav"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(ray_session, tmp_path_factory):
    from ray import serve

    d = tmp_path_factory.mktemp("rerank_run")
    emb = np.zeros(4, dtype=np.float32)
    qrows = []
    for qid, (text, chunks, gt) in QUERIES.items():
        qrows.append({"query_id": qid, "audio_id": gt, "chunk_index": -1, "text": text, "embedding": emb, "truncated": False})
        qrows += [{"query_id": qid, "audio_id": gt, "chunk_index": j, "text": c, "embedding": emb, "truncated": False}
                  for j, c in enumerate(chunks)]
    pq.write_table(pa.Table.from_pylist(qrows), d / "queries.parquet")
    srows, grows = [], []
    for qid, order in SHORTLIST.items():
        for rank, aid in enumerate(order, 1):
            srows.append({"query_id": qid, "mode": "audio-max+query-sum", "rank": rank, "audio_id": aid,
                          "score": 1.0 - 0.1 * rank})
        gt = QUERIES[qid][2]
        grows.append({"query_id": qid, "mode": "audio-max+query-sum", "gt_audio_id": gt,
                      "gt_rank": order.index(gt) + 1, "gt_score": 0.5})
    pq.write_table(pa.Table.from_pylist(srows), d / "shortlist.parquet")
    pq.write_table(pa.Table.from_pylist(grows), d / "gt_ranks.parquet")
    crows = []
    for aid, caps in CAPTIONS.items():
        if caps is None:
            crows.append({"audio_id": aid, "chunk_index": -1, "start_s": 0.0, "end_s": 0.0, "captioner": "hand",
                          "prompt": "", "caption": "", "status": "failed", "error": "unreadable: not audio"})
            continue
        for i, c in enumerate(caps):
            crows.append({"audio_id": aid, "chunk_index": i, "start_s": 30.0 * i, "end_s": 30.0 * (i + 1),
                          "captioner": "hand", "prompt": "", "caption": c, "status": "ok", "error": ""})
        crows.append({"audio_id": aid, "chunk_index": -1, "start_s": 0.0, "end_s": 60.0, "captioner": "hand",
                      "prompt": "", "caption": "; ".join(caps), "status": "ok", "error": ""})
    pq.write_table(pa.Table.from_pylist(crows), d / "captions.parquet")
    (d / "search_meta.json").write_text(json.dumps({
        "n_queries": 2, "n_audios": 5, "modes": ["audio-max+query-sum"], "model": "hand", "model_card": {},
        "query_chunking": "columns", "n_truncated_queries": 0, "n_queries_without_chunks": 0, "n_missing_gt": 0}))
    cfg = {"run_dir": str(d), "rerank": {"mode": "audio-max+query-sum", "top_n": 4, "match": "windows"},
           "serve": {"port": free_port(), "backend": {"kind": "bi-encoder", "device": "cpu"}}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    yield d
    serve.shutdown()


def test_rerank_job_fixes_the_order_and_keeps_uncaptioned_candidates(run_dir):
    assert main(["rerank", "--config", str(run_dir / "config.yaml")]) == 0
    t = pq.read_table(run_dir / "reranked.parquet").to_pandas()
    assert list(t.columns) == ["query_id", "rank", "audio_id", "clap_rank", "clap_score", "rerank_score",
                               "final_score", "note"]
    for qid, (_, _, gt) in QUERIES.items():
        rows = t[t.query_id == qid].sort_values("rank")
        assert len(rows) == 4 and rows["rank"].tolist() == [1, 2, 3, 4]
        assert rows.audio_id.iloc[0] == gt, rows
        broken = rows[rows.audio_id == "broken.wav"].iloc[0]
        assert np.isnan(broken.rerank_score) and "no caption (unreadable: not audio)" in broken.note
        assert np.isfinite(rows[rows.audio_id != "broken.wav"].rerank_score).all()


def test_evaluation_reports_final_figures(run_dir):
    assert main(["rerank", "--config", str(run_dir / "config.yaml")]) == 0
    assert main(["evaluate", "--config", str(run_dir / "config.yaml")]) == 0
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert final["clap_R@1"] == 50.0 and final["R@1"] == 100.0
    assert final["fixed_top1"] == 1 and final["demoted_top1"] == 0
    assert "After re-ranking" in (run_dir / "report.md").read_text()


def test_rerank_without_captions_is_a_clear_error(run_dir, tmp_path, capsys):
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["rerank"]["endpoint"] = "http://127.0.0.1:9"  # never reached: captions are checked first
    (run_dir / "captions.parquet").rename(tmp_path / "captions.parquet")
    try:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["rerank", "--config", str(tmp_path / "c.yaml")]) == 2
        assert "no captions" in capsys.readouterr().err
    finally:
        (tmp_path / "captions.parquet").rename(run_dir / "captions.parquet")


def test_rerank_through_an_existing_http_endpoint_and_a_named_serve_app(run_dir, tmp_path):
    """The job's three ways to the service: its own app by handle (tests above), an existing app
    of the cluster by name (serve://), and any endpoint over HTTP; all give the same ranking."""
    from ray import serve

    from larcq_ray.rerank.app import run_server
    from larcq_ray.rerank.config import RerankServeConfig

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    url = run_server(RerankServeConfig.model_validate(cfg["serve"]), blocking=False, app_name="shared-rerank")
    try:
        orders = []
        for endpoint in ("serve://shared-rerank", url):
            cfg["rerank"]["endpoint"] = endpoint
            (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
            assert main(["rerank", "--config", str(tmp_path / "c.yaml")]) == 0
            t = pq.read_table(run_dir / "reranked.parquet").to_pandas().sort_values(["query_id", "rank"])
            orders.append(t[["query_id", "audio_id"]].values.tolist())
            assert t[t["rank"] == 1].audio_id.tolist() == ["dog_rain.wav", "bell_car.wav"]
        assert orders[0] == orders[1]
    finally:
        serve.delete("shared-rerank")


def test_rerank_endpoint_errors_are_clear(run_dir, tmp_path, capsys):
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    for endpoint, expected in [("serve://no-such-app", "no Serve application 'no-such-app'"),
                               ("ftp://example", "expected http(s)://HOST:PORT or serve://APP_NAME")]:
        cfg["rerank"]["endpoint"] = endpoint
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["rerank", "--config", str(tmp_path / "c.yaml")]) == 2
        assert expected in capsys.readouterr().err


def test_more_windows_than_the_service_takes_are_split_into_several_requests(run_dir, tmp_path):
    """Each query sends 6 window captions; a service capped at 4 documents per request still re-ranks
    everything: split up front when the job starts the service, on its 413 answer otherwise."""
    from ray import serve

    from larcq_ray.rerank.app import run_server
    from larcq_ray.rerank.config import RerankServeConfig

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert main(["rerank", "--config", str(run_dir / "config.yaml")]) == 0
    expected = pq.read_table(run_dir / "reranked.parquet").to_pandas().sort_values(["query_id", "rank"])

    small = {**cfg["serve"], "max_documents": 4, "route_prefix": "/small"}
    url = run_server(RerankServeConfig.model_validate(small), blocking=False, app_name="small-rerank")
    own = {**small, "route_prefix": "/own"}  # the job's own app, beside the one above
    try:
        for endpoint, serve_cfg in ((None, own), (url, cfg["serve"]), ("serve://small-rerank", cfg["serve"])):
            c = {**cfg, "serve": serve_cfg, "rerank": {**cfg["rerank"], "endpoint": endpoint}}
            (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
            assert main(["rerank", "--config", str(tmp_path / "c.yaml")]) == 0, endpoint
            got = pq.read_table(run_dir / "reranked.parquet").to_pandas().sort_values(["query_id", "rank"])
            assert got.audio_id.tolist() == expected.audio_id.tolist(), endpoint
            np.testing.assert_allclose(got.rerank_score, expected.rerank_score, rtol=1e-5)
            assert json.loads((run_dir / "rerank_meta.json").read_text())["n_failed_queries"] == 0
    finally:
        serve.delete("small-rerank")


def test_a_query_whose_rerank_fails_keeps_its_clap_order_and_the_job_goes_on(run_dir, tmp_path):
    from larcq_ray.rerank.config import RerankJobConfig
    from larcq_ray.rerank.job import rerank_shortlist

    class FlakyClient:  # fails every request of query 1 (its chunks mention a bell or a car)
        def rerank(self, query, documents):
            if "bell" in query or "car" in query:
                raise RuntimeError("connection reset by peer")
            return [float("dog" in d) + float("rain" in d) for d in documents]

    meta = rerank_shortlist(run_dir, RerankJobConfig(top_n=4), FlakyClient())
    assert meta["n_failed_queries"] == 1 and meta["failed_query_ids"] == [1]
    t = pq.read_table(run_dir / "reranked.parquet").to_pandas().sort_values(["query_id", "rank"])
    q1 = t[t.query_id == 1]
    assert q1.audio_id.tolist() == SHORTLIST[1] and q1["rank"].tolist() == [1, 2, 3, 4]
    assert all(n.startswith("re-rank failed (RuntimeError: connection reset by peer)") for n in q1.note)
    assert t[t.query_id == 0].audio_id.iloc[0] == "dog_rain.wav"  # the other query was re-ranked
