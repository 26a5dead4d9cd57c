"""index -> search -> evaluate through Ray on a generated LARCQ benchmark with a tiny CLAP."""

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from larcq_ray.cli import main
from larcq_ray.offline.demo_benchmark import DemoBenchmarkSpec, write_demo_benchmark
from larcq_ray.index.store import IndexStore
from larcq_ray.search.scoring import MODES


@pytest.fixture(scope="module")
def run(ray_session, tiny_clap, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    bench = write_demo_benchmark(root / "bench", DemoBenchmarkSpec(n_audios=6, events_per_audio=(2, 3),
                                                                    event_seconds=(3.0, 5.0), seed=3))
    cfg = {
        "run_dir": str(root / "run"),
        "data": {"benchmark": str(bench)},
        "model": {"name_or_path": str(tiny_clap), "device": "cpu"},
        "index": {"batch_size": 4, "files_per_decode_task": 2, "commit_every_files": 2,
                  "chunking": {"mode": "fixed", "window_s": 5.0}},
        "search": {"query_chunking": "columns", "top_k": 4},
        "stages": ["index", "search", "evaluate"],  # caption and rerank run in their own test below
    }
    # One query longer than the text tower's 77 tokens: truncated and counted, never dropped.
    first = next(csv.DictReader(open(bench / "queries.csv")))["audio_id"]
    with open(bench / "queries.csv", "a", newline="") as f:
        csv.writer(f).writerow([first, "a long rising sweep then a bell " * 30, "a rising sweep", "a bell"])
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 0
    return root / "run", bench, path


def test_artifacts(run):
    run_dir, bench, _ = run
    n_q = sum(1 for _ in csv.DictReader(open(bench / "queries.csv")))
    short = pq.read_table(run_dir / "shortlist.parquet").to_pandas()
    assert set(short["mode"]) == set(MODES)
    assert len(short) == n_q * len(MODES) * 4
    assert short.groupby(["mode", "query_id"])["rank"].apply(list).map(lambda r: r == [1, 2, 3, 4]).all()
    # scores are sorted within each (mode, query)
    assert short.groupby(["mode", "query_id"])["score"].apply(lambda s: bool(np.all(np.diff(s.values) <= 1e-7))).all()
    for mode in MODES:
        rows = list(csv.reader(open(run_dir / f"retrieved_{mode}.csv")))
        assert rows[0] == ["query"] + [f"retrieved_audio_{i}" for i in range(1, 5)] + ["groundtruth_audio"]
        assert len(rows) == n_q + 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics) == list(MODES)
    assert set(metrics["none"]) >= {"R@1", "R@5", "R@10", "mAP@10", "mean_rank", "median_rank"}
    report = (run_dir / "report.md").read_text()
    assert "chance level" in report and sum(line.startswith("| audio-") for line in report.splitlines()) == 6
    assert (run_dir / "recall_at_k.png").read_bytes()[:4] == b"\x89PNG"
    q = pq.read_table(run_dir / "queries.parquet").to_pandas()
    assert set(q.query_id) == set(range(n_q)) and (q.chunk_index == -1).sum() == n_q
    meta = json.loads((run_dir / "search_meta.json").read_text())
    assert meta["n_truncated_queries"] == 1 and meta["n_queries"] == n_q
    assert "1 queries exceeded the text tower's limit" in report
    assert q[(q.query_id == n_q - 1) & (q.chunk_index == -1)].truncated.item()


def test_ground_truth_ranks_match_a_brute_force_check(run):
    """Recompute audio-max+query-sum from the stored embeddings with plain loops."""
    run_dir, _, _ = run
    audios = IndexStore(run_dir / "index").load_embeddings()
    q = pq.read_table(run_dir / "queries.parquet").to_pandas()
    ranks = pq.read_table(run_dir / "gt_ranks.parquet").to_pandas()
    ranks = ranks[ranks["mode"] == "audio-max+query-sum"].set_index("query_id")
    for qid, group in q.groupby("query_id"):
        chunks = np.stack(group[group.chunk_index >= 0].embedding.map(np.asarray).tolist())
        scores = []
        for a in range(len(audios.audio_ids)):
            ac = audios.chunk_emb[audios.chunk_offsets[a]:audios.chunk_offsets[a + 1]]
            scores.append((chunks @ ac.T).max(axis=1).sum())
        gt = audios.audio_ids.index(group.audio_id.iloc[0])
        expected = 1 + sum(s > scores[gt] + 1e-6 for s in scores)
        assert ranks.loc[qid, "gt_rank"] == expected


def test_search_rerun_reuses_query_embeddings(run):
    run_dir, _, cfg = run
    before = (run_dir / "queries.parquet").stat().st_mtime_ns
    assert main(["search", "--config", str(cfg), "--set", "search.modes=[audio-max]"]) == 0
    assert (run_dir / "queries.parquet").stat().st_mtime_ns == before
    assert set(pq.read_table(run_dir / "shortlist.parquet").column("mode").to_pylist()) == {"audio-max"}


def test_caption_rerank_evaluate_after_search(run, tmp_path_factory):
    """The second half: tiny Qwen2-Audio captions (random weights) -> /rerank on Serve -> final figures."""
    import socket

    from ray import serve

    from larcq_ray.offline.tiny_alm import build_tiny_qwen2_audio

    run_dir, bench, cfg_path = run
    alm = build_tiny_qwen2_audio(tmp_path_factory.mktemp("alm"), ["a tone rings", "noise hisses", "a bell"] * 20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["caption"] = {"backend": {"model": str(alm), "window_s": 4.0, "max_new_tokens": 6, "device": "cpu"}}
    cfg["rerank"] = {"mode": "audio-max+query-sum", "top_n": 3}
    cfg["serve"] = {"port": port, "backend": {"kind": "bi-encoder", "device": "cpu"}}
    cfg["search"]["modes"] = list(MODES)
    cfg_path.write_text(yaml.safe_dump(cfg))
    try:
        assert main(["search", "--config", str(cfg_path)]) == 0
        assert main(["caption", "--config", str(cfg_path)]) == 0
        assert main(["rerank", "--config", str(cfg_path)]) == 0
        assert main(["evaluate", "--config", str(cfg_path)]) == 0
    finally:
        serve.shutdown()
    short = pq.read_table(run_dir / "shortlist.parquet").to_pandas()
    wanted = set(short[(short["mode"] == "audio-max+query-sum") & (short["rank"] <= 3)].audio_id)
    caps = pq.read_table(run_dir / "captions.parquet").to_pandas()
    assert set(caps.audio_id) == wanted and (caps.status == "ok").all()
    assert not caps.duplicated(["audio_id", "chunk_index"]).any()
    assert (caps.groupby("audio_id").chunk_index.min() == -1).all()  # every audio has a timeline caption
    reranked = pq.read_table(run_dir / "reranked.parquet").to_pandas()
    n_q = reranked.query_id.nunique()
    assert len(reranked) == 3 * n_q and np.isfinite(reranked.rerank_score).all()
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert final["n_queries"] == n_q and 0 <= final["R@1"] <= 100
    assert final["clap_R@1"] == json.loads((run_dir / "metrics.json").read_text())["audio-max+query-sum"]["R@1"]
