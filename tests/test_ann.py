"""search.method: ann — a FAISS index over chunk embeddings proposes candidates, scored exactly."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from larcq_ray.core.errors import LarcqError
from larcq_ray.search.ann import AnnSearcher, ann_state, build_ann, ensure_ann
from larcq_ray.search.config import MODES, AnnConfig
from larcq_ray.search.scoring import score
from larcq_ray.search.sharded import ShardOptions, ShardSet
from test_sharded_search import assert_same, make_queries, write_synthetic_index


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return write_synthetic_index(tmp_path_factory.mktemp("ann") / "index", 60, 16, seed=4, whole=True)


def _built(index, cfg: AnnConfig):
    """(searcher, ok files) of an ANN index built with cfg on the module's index."""
    build_ann(index.uri, cfg, shard_chunks=40, num_cpus=0.5)
    files = index.ok_files()
    return AnnSearcher(index.uri, cfg.name, files.column("audio_id"), cfg.nprobe), files


def test_ann_returning_everything_equals_exact(ray_session, index):
    # IVF with every list probed and more candidates per row than chunks: every audio is a candidate
    cfg = AnnConfig(factory="IVF4,Flat", nprobe=4, candidates=10_000, train_sample=1000)
    meta = build_ann(index.uri, cfg, shard_chunks=40, num_cpus=0.5)
    n_chunks = len(index.load_embeddings().chunk_emb)
    assert meta["n_rows"] == n_chunks and meta["n_shards"] > 1
    assert ann_state(index, "default", index.ok_files())[0] == "ok"
    files = index.ok_files()
    ann = AnnSearcher(index.uri, "default", files.column("audio_id"), cfg.nprobe)
    q = make_queries(6, 16, seed=3)
    cands = ann.candidates(q.whole_emb, q.chunk_emb, q.chunk_offsets, cfg.candidates)
    assert all(len(c) == files.num_rows for c in cands)
    audios = index.load_embeddings()
    gt = np.array([0, 5, -1, 59, 3, 3])
    want = score(q, audios, list(MODES), top_k=8, gt_index=gt)
    for persistent in (False, True):  # tasks that load only the candidates, and live shard actors
        shards = ShardSet(index.uri, ShardOptions(shard_chunks=40, num_cpus=0.5 if not persistent else 0,
                                                  device="cpu"), persistent=persistent)
        try:
            assert_same(shards.search(q, list(MODES), top_k=8, gt_gidx=gt, candidates=cands), want, list(MODES))
            # without ground truth (no count-above pass): the same lists
            assert_same(shards.search(q, list(MODES), top_k=8, candidates=cands),
                        score(q, audios, list(MODES), top_k=8), list(MODES))
        finally:
            shards.close()


def test_candidate_rescoring_breaks_exact_ties_by_audio_id(ray_session, tmp_path):
    """One-hot embeddings (exact dot products, many ties): every audio a candidate, no ground truth:
    the candidate path gives score()'s lists on every mode, ties by audio id."""
    store = write_synthetic_index(tmp_path / "ties", 30, 5, seed=8, whole=True, onehot=True)
    audios = store.load_embeddings()
    q = make_queries(9, 5, seed=2, onehot=True)
    shards = ShardSet(store.uri, ShardOptions(shard_chunks=12, num_cpus=0.5, device="cpu"))
    everything = [np.arange(len(audios.audio_ids))] * 9
    want = score(q, audios, list(MODES), top_k=7)
    assert (want["audio-max"].topk_score[:, 1:] == want["audio-max"].topk_score[:, :-1]).any()
    assert_same(shards.search(q, list(MODES), top_k=7, candidates=everything), want, list(MODES))


def test_ann_candidates_are_rescored_exactly(ray_session, index):
    """Few candidates: the lists hold only candidates, with their exact scores."""
    cfg = AnnConfig(name="small", factory="Flat", candidates=3)
    ann, _ = _built(index, cfg)
    q = make_queries(4, 16, seed=9)
    cands = ann.candidates(q.whole_emb, q.chunk_emb, q.chunk_offsets, cfg.candidates)
    shards = ShardSet(index.uri, ShardOptions(shard_chunks=40, num_cpus=0.5, device="cpu"))
    got = shards.search(q, ["audio-max+query-sum"], top_k=2, candidates=cands)["audio-max+query-sum"]
    exact_all = score(q, index.load_embeddings(), ["audio-max+query-sum"], top_k=60)["audio-max+query-sum"]
    for i in range(4):
        assert set(got.topk_index[i]) <= set(cands[i].tolist())
        full = dict(zip(exact_all.topk_index[i].tolist(), exact_all.topk_score[i].tolist()))
        np.testing.assert_allclose(got.topk_score[i], [full[j] for j in got.topk_index[i]], atol=1e-5)
        best = max(cands[i].tolist(), key=lambda j: (full[j], -j))
        assert got.topk_index[i, 0] == best


def test_a_shard_is_added_in_float32_slices_as_if_at_once(tmp_path, monkeypatch):
    """_add_task reads a float16 index as stored and adds it in slices: the index it gives is the
    one adding every float32 row at once gives (same codes, same order)."""
    import larcq_ray.search.ann as ann_mod

    store = write_synthetic_index(tmp_path / "index", 30, 16, seed=6, whole=False, dtype="float16")
    files = store.ok_files()
    faiss = ann_mod.faiss_module()
    x, ids = ann_mod._chunk_matrix(store, files)
    assert x.dtype == np.float32 and ann_mod._chunk_matrix(store, files, keep_half=True)[0].dtype == np.float16
    for factory in ("IVF4,PQ4x4", "Flat"):
        trained = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
        trained.train(x)
        whole = ann_mod._deserialize(ann_mod._serialize(trained))
        whole.add(x)
        monkeypatch.setattr(ann_mod, "_ADD_ROWS", 7)  # many slices
        buf, got_ids = ann_mod._add_task(store.uri, files, ann_mod._serialize(trained))
        assert got_ids.equals(ids)
        assert np.array_equal(np.asarray(buf), ann_mod._serialize(whole)), factory


def test_rescore_keeps_the_audios_with_the_best_vote(index):
    """With exact similarities (Flat) and every chunk fetched, the vote of an audio is its whole-query
    audio-max score plus its audio-max+query-sum score: rescore=r keeps exactly the r best by that."""
    cfg = AnnConfig(name="vote", factory="Flat", candidates=10_000)
    ann, files = _built(index, cfg)
    q = make_queries(5, 16, seed=21)
    full = ann.candidates(q.whole_emb, q.chunk_emb, q.chunk_offsets, cfg.candidates)
    kept = ann.candidates(q.whole_emb, q.chunk_emb, q.chunk_offsets, cfg.candidates, rescore=7)
    exact = score(q, index.load_embeddings(), ["audio-max", "audio-max+query-sum"], top_k=files.num_rows)
    for i in range(5):
        assert len(full[i]) == files.num_rows and len(kept[i]) == 7
        vote = {}
        for m in ("audio-max", "audio-max+query-sum"):
            for j, sc in zip(exact[m].topk_index[i].tolist(), exact[m].topk_score[i].tolist()):
                vote[j] = vote.get(j, 0.0) + sc
        assert kept[i].tolist() == sorted(sorted(vote, key=lambda j: (-vote[j], j))[:7])


def test_stale_ann_index_is_refused_or_rebuilt(ray_session, tmp_path):
    store = write_synthetic_index(tmp_path / "index", 12, 8, seed=5, whole=False)
    cfg = AnnConfig(factory="Flat", build_on_demand=False)
    with pytest.raises(LarcqError, match="build-ann"):
        ensure_ann(store.uri, cfg, store.ok_files(), 1000, 0.5)
    build_ann(store.uri, cfg, 1000, 0.5)
    assert ann_state(store, "default", store.ok_files())[0] == "ok"
    store.mark_deleted([store.ok_files().column("audio_id")[0].as_py()])
    assert ann_state(store, "default", store.ok_files())[0] == "stale"
    with pytest.raises(LarcqError, match="stale"):
        ensure_ann(store.uri, cfg, store.ok_files(), 1000, 0.5)
    meta = ensure_ann(store.uri, cfg.model_copy(update={"build_on_demand": True}), store.ok_files(), 1000, 0.5)
    assert meta["n_rows"] == len(store.load_embeddings().chunk_emb)
    assert ann_state(store, "default", store.ok_files())[0] == "ok"


def test_missing_faiss_says_how_to_install(monkeypatch):
    from larcq_ray.search.ann import faiss_module

    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(LarcqError, match="pip install faiss-cpu"):
        faiss_module()


def test_search_engine_ann_answers_as_exact(search_corpus, tmp_path):
    """The /search engine (what a Serve replica runs) with search.method: ann, built on demand, ranks
    as the exact engine when the ANN returns every chunk; shards as live actors give the same too."""
    import yaml

    from larcq_ray.config import load_config
    from larcq_ray.search.router import SearchEngine

    _, cfg = search_corpus
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    exact = SearchEngine(load_config(str(path)))
    ann = SearchEngine(load_config(str(path), ["search.method=ann", "search.ann.factory=Flat",
                                               "search.ann.candidates=1000", "search.ann.name=engine_test",
                                               "search.shard_chunks=1", "search.shard_num_cpus=0"]))
    try:
        assert ann.ann is not None and ann.ann.ntotal() > 0
        query = "a church bell rings and then a choir sings"
        for mode in ("audio-max+query-sum", "none"):
            a, e = ann.search(query, 2, mode), exact.search(query, 2, mode)
            assert [r.audio_id for r in a.results] == [r.audio_id for r in e.results]
            np.testing.assert_allclose([r.score for r in a.results], [r.score for r in e.results], atol=1e-5)
            assert [len(r.windows) for r in a.results] == [len(r.windows) for r in e.results]
    finally:
        ann.shards.close()


def test_build_ann_command(search_corpus, tmp_path):
    import json

    import yaml

    from larcq_ray.cli import main
    from larcq_ray.index.store import IndexStore

    root, cfg = search_corpus
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["build-ann", "--config", str(path), "--set", "search.ann.name=cli",
                 "--set", "search.ann.factory=Flat"]) == 0
    store = IndexStore(root / "run" / "index")
    meta = json.loads((root / "run" / "index" / "ann" / "cli.json").read_text())
    assert meta["factory"] == "Flat" and meta["n_rows"] == len(store.load_embeddings().chunk_emb)
    assert ann_state(store, "cli", store.ok_files())[0] == "ok"


def test_search_job_with_ann_writes_the_exact_shortlist(search_corpus, tmp_path):
    """`larcq-ray search` with search.method: ann (built on demand) and an ANN that returns every
    chunk writes the same shortlist and results as the exact job."""
    import pyarrow.parquet as pq
    import yaml

    from larcq_ray.cli import main

    root, cfg = search_corpus
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**cfg, "index": {**cfg["index"], "location": str(root / "run" / "index")}}))
    out = {}
    for method in ("exact", "ann"):
        run_dir = tmp_path / method
        argv = ["search", "--config", str(path), "--run-dir", str(run_dir), "--query",
                "a church bell rings and then a choir sings", "--query", "a car passes",
                "--set", f"search.method={method}", "--set", "search.ann.factory=Flat", "--set", "search.ann.name=job",
                "--set", "search.shard_chunks=1", "--set", "search.top_k=2"]
        assert main(argv) == 0
        out[method] = (pq.read_table(run_dir / "shortlist.parquet").to_pandas(),
                       pq.read_table(run_dir / "results.parquet").to_pandas())
    for a, e in zip(out["ann"], out["exact"]):
        assert list(a["audio_id"]) == list(e["audio_id"]) and len(a) > 0
        np.testing.assert_allclose(a["score"], e["score"], atol=1e-5)


def test_auto_candidates_grow_with_the_index():
    """search.ann.candidates: auto fetches about chunks / 4096 a query row (a power of two, at least 256):
    the depths that kept recall@10 >= 0.95 at 1M and 10M chunks in bench_scale.py."""
    from larcq_ray.search.ann import resolve_candidates

    assert AnnConfig().candidates == "auto"
    assert [resolve_candidates("auto", n) for n in (10, 1_000_000, 10_000_000, 100_000_000)] == [256, 256, 2048, 32768]
    assert resolve_candidates(7, 10_000_000) == 7 and AnnConfig(candidates="300").candidates == 300
    with pytest.raises(ValueError):
        AnnConfig(candidates=0)
