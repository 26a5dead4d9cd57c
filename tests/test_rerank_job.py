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

    from larcq_ray.rerank.app import RerankServeConfig, run_server

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
