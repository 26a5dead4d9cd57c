"""Sharded exact search on Ray equals single-process search: same top-K ids (ties by audio id),
scores within 1e-5, same ground-truth rank; shards answer with indices and scores only."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from larcq_ray.core.errors import LarcqError
from larcq_ray.index.store import IndexStore
from larcq_ray.search.config import MODES
from larcq_ray.search.scoring import QueryEmbeddings, count_above, score
from larcq_ray.search.sharded import ShardOptions, ShardSet
from larcq_ray.search.shards import ShardResult, ShardScorer, plan_shards

AUDIO_MODES = [m for m in MODES if m.startswith("audio-")]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_synthetic_index(root, n_audios: int, dim: int, seed: int, whole: bool = True, per_part: int = 5,
                          onehot: bool = False, dtype: str = "float32") -> IndexStore:
    """An index written through the store API: parts of `per_part` audios, one audio's chunks split
    over two parts, file rows committed in two files parts. onehot: every embedding a basis vector
    (dot products exact: many exact ties)."""
    rng = np.random.default_rng(seed)
    store = IndexStore(root)
    store.open_for_write({"model": "synthetic", "sample_rate": 48000, "chunking": {}, "whole_file": whole,
                          "embedding_dtype": dtype})
    ids = [f"a{i:04d}.wav" for i in rng.permutation(n_audios)]  # written out of id order
    counts = rng.integers(1, 8, n_audios)

    def vecs(n):
        if onehot:
            return np.eye(dim, dtype=np.float32)[rng.integers(0, dim, n)]
        return _unit(rng.normal(size=(n, dim)))

    files = []
    for start in range(0, n_audios, per_part):
        rows = []
        for aid, c in zip(ids[start:start + per_part], counts[start:start + per_part]):
            emb = vecs(int(c) + int(whole))
            chunk_idx = ([-1] if whole else []) + list(range(int(c)))
            rows += [{"audio_id": aid, "chunk_index": j, "start_s": 10.0 * max(j, 0), "end_s": 10.0 * max(j, 0) + 10,
                      "embedding": e.tolist()} for j, e in zip(chunk_idx, emb)]
        long_id = ids[start]
        if counts[start] >= 2:  # its later chunks go to a part of their own: a file spanning two parts
            cut = [r for r in rows if r["audio_id"] == long_id and r["chunk_index"] >= 1]
            rows = [r for r in rows if not (r["audio_id"] == long_id and r["chunk_index"] >= 1)]
            extra = store.write_chunk_part(pa.Table.from_pylist(cut))
        else:
            extra = None
        name = store.write_chunk_part(pa.Table.from_pylist(rows))
        for aid, c in zip(ids[start:start + per_part], counts[start:start + per_part]):
            parts = [name] + ([extra] if aid == long_id and extra else [])
            files.append({"audio_id": aid, "duration_s": 10.0 * c, "sample_rate": 48000, "channels": 1,
                          "n_chunks": int(c) + int(whole), "status": "ok", "chunk_parts": parts})
    files.append({"audio_id": "zz_failed.wav", "duration_s": 0.0, "sample_rate": 0, "channels": 0, "n_chunks": 0,
                  "status": "failed", "error": "decode: broken", "chunk_parts": []})
    half = len(files) // 2
    store.commit(files[:half])
    store.commit(files[half:])
    return store


def make_queries(n: int, dim: int, seed: int, onehot: bool = False) -> QueryEmbeddings:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, n)

    def vecs(k):
        if onehot:
            return np.eye(dim, dtype=np.float32)[rng.integers(0, dim, k)]
        return _unit(rng.normal(size=(k, dim)))

    return QueryEmbeddings([str(i) for i in range(n)], vecs(n), vecs(int(counts.sum())),
                           np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def assert_same(got: dict, want: dict, modes) -> None:
    for m in modes:
        g, w = got[m], want[m]
        np.testing.assert_array_equal(g.topk_index, w.topk_index, err_msg=m)
        np.testing.assert_allclose(g.topk_score, w.topk_score, atol=1e-5, err_msg=m)
        if w.gt_rank is not None:
            np.testing.assert_array_equal(g.gt_rank, w.gt_rank, err_msg=m)
            np.testing.assert_allclose(g.gt_score, w.gt_score, atol=1e-5, err_msg=m)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return {
        "whole": write_synthetic_index(root / "whole", 60, 16, seed=1, whole=True),
        "chunks": write_synthetic_index(root / "chunks", 45, 16, seed=2, whole=False, per_part=4, dtype="float16"),
        "ties": write_synthetic_index(root / "ties", 50, 6, seed=3, whole=True, onehot=True),
    }


def _gt(n_q: int, n_aud: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed).integers(0, n_aud, n_q)
    g[::5] = -1  # some queries without ground truth
    return g.astype(np.int64)


def test_plan_covers_every_file_once_by_its_first_part(indexes):
    files = indexes["whole"].ok_files()
    shards = plan_shards(files, 20)
    assert len(shards) > 5
    all_g = np.concatenate([s.gidx for s in shards])
    assert sorted(all_g.tolist()) == list(range(files.num_rows))
    first = [p[0] for p in files.column("chunk_parts").to_pylist()]
    for s in shards:
        assert s.files.column("audio_id").to_pylist() == [files.column("audio_id")[i].as_py() for i in s.gidx]
        assert len({first[i] for i in s.gidx} & {first[i] for o in shards if o is not s for i in o.gidx}) == 0
    assert len(plan_shards(files, 10**9)) == 1
    with pytest.raises(LarcqError):
        plan_shards(files, 0)


@pytest.mark.parametrize("name, modes, shard_chunks", [
    ("whole", list(MODES), 20),
    ("chunks", AUDIO_MODES, 13),
    ("ties", list(MODES), 25),
])
def test_sharded_equals_single_process(ray_session, indexes, name, modes, shard_chunks):
    store = indexes[name]
    audios = store.load_embeddings()
    dim = audios.chunk_emb.shape[1]
    q = make_queries(23, dim, seed=7, onehot=name == "ties")
    gt = _gt(23, len(audios.audio_ids), seed=8)
    want = score(q, audios, modes, top_k=9, gt_index=gt, chunk_block=17)
    shards = ShardSet(store.uri, ShardOptions(shard_chunks=shard_chunks, num_cpus=0.5, chunk_block=17, device="cpu"))
    assert len(shards.shards) > 2 and shards.audio_ids == audios.audio_ids
    assert_same(shards.search(q, modes, top_k=9, gt_gidx=gt), want, modes)
    # without ground truth: the same lists
    assert_same(shards.search(q, modes, top_k=9), score(q, audios, modes, top_k=9), modes)
    if name == "ties":  # the data really has ties, broken by audio id
        s = want["audio-max"].topk_score
        assert (s[:, 1:] == s[:, :-1]).any()


def test_persistent_shard_actors_and_in_process(ray_session, indexes):
    store = indexes["whole"]
    audios = store.load_embeddings()
    q = make_queries(6, 16, seed=11)
    want = score(q, audios, ["audio-max+query-sum", "none"], top_k=5)
    live = ShardSet(store.uri, ShardOptions(shard_chunks=100, num_cpus=0, device="cpu"), persistent=True)
    try:
        assert len(live.actors) == len(live.shards) > 1
        assert live.info["n_audios"] == len(audios.audio_ids) and live.info["has_whole"]
        for _ in range(2):  # the actors keep their shards between calls
            assert_same(live.search(q, ["audio-max+query-sum", "none"], top_k=5), want, ["audio-max+query-sum", "none"])
    finally:
        live.close()
    one = ShardSet(store.uri, ShardOptions(shard_chunks=10**6, device="cpu"), persistent=True, in_process=True)
    assert one.local is not None and not one.actors
    assert_same(one.search(q, ["audio-max+query-sum", "none"], top_k=5), want, ["audio-max+query-sum", "none"])


def test_a_float16_index_stays_half_in_shard_memory(indexes, monkeypatch):
    import larcq_ray.search.scoring as scoring

    monkeypatch.setattr(scoring, "_WIDEN_ROWS", 5)  # sums widened over many slices
    store = indexes["chunks"]
    files = store.ok_files()
    half = ShardScorer(store.uri, files, np.arange(files.num_rows), device="cpu")
    full = store.load_embeddings()
    assert half.audios.chunk_emb.dtype == np.float16 and full.chunk_emb.dtype == np.float32
    np.testing.assert_array_equal(half.audios.chunk_emb.astype(np.float32), full.chunk_emb)
    q = make_queries(7, 16, seed=13)
    gt = _gt(7, files.num_rows, seed=14)
    # widened block by block, the scores are those of the float32 embeddings (sums too)
    assert_same(score(q, half.audios, AUDIO_MODES, top_k=6, gt_index=gt, chunk_block=11),
                score(q, full, AUDIO_MODES, top_k=6, gt_index=gt, chunk_block=11), AUDIO_MODES)


class _Recording(ShardSet):
    """Keeps what the shards sent back to the driver."""

    got: list

    def _run(self, method, queries, per_shard, progress=None):
        out = super()._run(method, queries, per_shard, progress)
        self.got = getattr(self, "got", []) + out
        return out


def test_driver_receives_no_embeddings(ray_session, indexes):
    store = indexes["whole"]
    q = make_queries(5, 16, seed=12)
    shards = _Recording(store.uri, ShardOptions(shard_chunks=20, num_cpus=0.5, device="cpu"))
    gt = np.array([0, 3, -1, 7, 9])
    shards.search(q, list(MODES), top_k=4, gt_gidx=gt)
    assert len(shards.got) == len(shards.shards)
    for r in shards.got:
        assert isinstance(r, ShardResult)
        fields = [*r.top_gidx.values(), *r.top_score.values(), *r.above.values()]
        for a in fields:  # (Q, k) or (Q,) indices, scores and counts; nothing with an embedding axis
            assert a.dtype in (np.int64, np.float32) and a.shape[0] == 5 and a.size <= 5 * 4
        assert set(vars(r)) == {"top_gidx", "top_score", "above", "n_chunks", "has_whole"}


def test_count_above_matches_single_process_rank():
    rng = np.random.default_rng(5)
    from larcq_ray.index.store import AudioEmbeddings

    counts = rng.integers(1, 6, 40)
    off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    audios = AudioEmbeddings([f"x{i:03d}" for i in range(40)], _unit(rng.normal(size=(off[-1], 8))), off,
                             _unit(rng.normal(size=(40, 8))))
    q = make_queries(9, 8, seed=6)
    gt = rng.integers(0, 40, 9)
    want = score(q, audios, list(MODES), top_k=6, gt_index=gt, chunk_block=11)
    cnt, top = count_above(q, audios, list(MODES), {m: want[m].gt_score for m in MODES}, gt, exclude=gt,
                           top_k=6, chunk_block=11)
    for m in MODES:
        np.testing.assert_array_equal(cnt[m] + 1, want[m].gt_rank)
        np.testing.assert_array_equal(top[m].topk_index, want[m].topk_index)
        np.testing.assert_array_equal(top[m].topk_score, want[m].topk_score)


def test_whole_file_modes_on_an_index_without_them_say_so(ray_session, indexes):
    shards = ShardSet(indexes["chunks"].uri, ShardOptions(shard_chunks=30, num_cpus=0.5, device="cpu"))
    with pytest.raises(LarcqError, match="whole-file"):
        shards.search(make_queries(2, 16, seed=1), ["none"], top_k=3)
