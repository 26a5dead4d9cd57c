"""The blocked, vectorized scorer against a plain per-query, per-audio loop."""

from __future__ import annotations

import numpy as np
import pytest

from larcq_ray.search import scoring
from larcq_ray.core.errors import LarcqError
from larcq_ray.search.scoring import MODES, AudioEmbeddings, QueryEmbeddings, _plan_blocks, score


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def make(rng: np.random.Generator, n_q: int = 11, n_a: int = 9, dim: int = 16,
         a_chunks: tuple[int, int] = (1, 7), q_chunks: tuple[int, int] = (1, 5)):
    ac = rng.integers(a_chunks[0], a_chunks[1] + 1, n_a)
    qc = rng.integers(q_chunks[0], q_chunks[1] + 1, n_q)
    audios = AudioEmbeddings([f"a{i}" for i in range(n_a)], _unit(rng, int(ac.sum()), dim), _offsets(ac),
                             _unit(rng, n_a, dim))
    queries = QueryEmbeddings([f"q{i}" for i in range(n_q)], _unit(rng, n_q, dim), _unit(rng, int(qc.sum()), dim),
                              _offsets(qc))
    return queries, audios


def brute_force(queries: QueryEmbeddings, audios: AudioEmbeddings) -> dict[str, np.ndarray]:
    """{mode: (Q, A) scores}, one (query, audio) pair at a time, reducing the full grid."""
    red = {"max": np.max, "sum": np.sum}
    out = {m: np.zeros((len(queries.query_ids), len(audios.audio_ids))) for m in MODES}
    for qi in range(len(queries.query_ids)):
        q = queries.whole_emb[qi].astype(np.float64)
        qc = queries.chunk_emb[queries.chunk_offsets[qi]:queries.chunk_offsets[qi + 1]].astype(np.float64)
        for ai in range(len(audios.audio_ids)):
            ac = audios.chunk_emb[audios.chunk_offsets[ai]:audios.chunk_offsets[ai + 1]].astype(np.float64)
            aw = audios.whole_emb[ai].astype(np.float64) if audios.whole_emb is not None else None
            grid = qc @ ac.T
            if aw is not None:
                out["none"][qi, ai] = q @ aw
                out["query-max"][qi, ai] = (qc @ aw).max()
                out["query-sum"][qi, ai] = (qc @ aw).sum()
            out["audio-max"][qi, ai] = (ac @ q).max()
            out["audio-sum"][qi, ai] = (ac @ q).sum()
            for x in ("max", "sum"):
                for y in ("max", "sum"):
                    out[f"audio-{x}+query-{y}"][qi, ai] = red[y](red[x](grid, axis=1))
    return out


def ranking(s: np.ndarray) -> np.ndarray:
    """Score descending, ties by index ascending."""
    return np.lexsort((np.arange(len(s)), -s))


@pytest.mark.parametrize("seed,tile_cols,cache_bytes,buffer_bytes", [(0, 2048, 2**29, 2**29), (1, 4, 0, 0)])
def test_all_modes_match_brute_force(seed, tile_cols, cache_bytes, buffer_bytes, monkeypatch):
    # Case 1: query blocks mix ground truths from several audio blocks (keys kept until resolved).
    # Case 2: one ground-truth block per query block, grids in tiles of a few audios, no block cache.
    monkeypatch.setattr(scoring, "_CPU_TILE_COLS", tile_cols)
    monkeypatch.setattr(scoring, "_CACHE_BYTES", cache_bytes)
    monkeypatch.setattr(scoring, "_BUFFER_BYTES", buffer_bytes)
    rng = np.random.default_rng(seed)
    queries, audios = make(rng)
    n_q, n_a = len(queries.query_ids), len(audios.audio_ids)
    gt = rng.integers(0, n_a, n_q)
    gt[[2, 7]] = -1
    done = []
    got = score(queries, audios, top_k=50, gt_index=gt, query_block=3, chunk_block=10, progress=done.append)
    assert list(got) == list(MODES)
    assert done[-1] == n_q and done == sorted(done) and len(done) > 3
    ref = brute_force(queries, audios)
    for m in MODES:
        r = got[m]
        assert r.topk_index.shape == (n_q, n_a) and r.topk_index.dtype == np.int64
        assert r.topk_score.dtype == np.float32
        for qi in range(n_q):
            order = ranking(ref[m][qi])
            np.testing.assert_array_equal(r.topk_index[qi], order, err_msg=f"{m} query {qi}")
            np.testing.assert_allclose(r.topk_score[qi], ref[m][qi][order], rtol=1e-4, atol=1e-5, err_msg=m)
            if gt[qi] < 0:
                assert r.gt_rank[qi] == 0 and np.isnan(r.gt_score[qi])
            else:
                assert r.gt_rank[qi] == 1 + int(np.flatnonzero(order == gt[qi])[0]), (m, qi)
                np.testing.assert_allclose(r.gt_score[qi], ref[m][qi, gt[qi]], rtol=1e-4, atol=1e-5)
                # the reported gt score is exactly the one in the top-K list
                assert r.topk_score[qi, r.gt_rank[qi] - 1] == r.gt_score[qi]


def test_top_k_smaller_than_audios_and_default_blocks():
    rng = np.random.default_rng(5)
    queries, audios = make(rng, n_q=6, n_a=30)
    ref = brute_force(queries, audios)
    got = score(queries, audios, modes=["audio-max+query-sum", "none"], top_k=4)
    assert list(got) == ["audio-max+query-sum", "none"] and got["none"].gt_rank is None
    for m, r in got.items():
        assert r.topk_index.shape == (6, 4)
        for qi in range(6):
            np.testing.assert_array_equal(r.topk_index[qi], ranking(ref[m][qi])[:4])
    none_known = score(queries, audios, modes=["audio-sum"], top_k=4, gt_index=np.full(6, -1))["audio-sum"]
    assert (none_known.gt_rank == 0).all() and np.isnan(none_known.gt_score).all()
    np.testing.assert_array_equal(none_known.topk_index[0], ranking(ref["audio-sum"][0])[:4])


def _dyadic(rng: np.random.Generator, n: int, dim: int = 4) -> np.ndarray:
    """Unit vectors with entries +-1/2: every dot product and sum is exact, so ties are real ties."""
    return (rng.choice([-0.5, 0.5], size=(n, dim))).astype(np.float32)


def test_ties_follow_index_order_and_gt_rank_counts_all_audios():
    rng = np.random.default_rng(3)
    n_a, n_q = 12, 8
    counts = rng.integers(1, 4, n_a)
    chunks = _dyadic(rng, int(counts.sum()))
    whole = _dyadic(rng, n_a)
    # Duplicate audios: 7 and 10 copy 2, 9 copies 4; in different blocks under chunk_block=3.
    off = _offsets(counts)
    chunk_list = [chunks[off[i]:off[i + 1]] for i in range(n_a)]
    for dst, src in ((7, 2), (10, 2), (9, 4)):
        chunk_list[dst], whole[dst] = chunk_list[src], whole[src]
    counts = np.array([len(c) for c in chunk_list])
    audios = AudioEmbeddings([f"a{i}" for i in range(n_a)], np.concatenate(chunk_list), _offsets(counts), whole)
    qc = rng.integers(1, 4, n_q)
    queries = QueryEmbeddings([f"q{i}" for i in range(n_q)], _dyadic(rng, n_q), _dyadic(rng, int(qc.sum())),
                              _offsets(qc))
    gt = np.array([2, 7, 10, 9, 4, 0, -1, 11])
    got = score(queries, audios, top_k=5, gt_index=gt, query_block=2, chunk_block=3)
    ref = brute_force(queries, audios)
    n_ties = 0
    for m in MODES:
        for qi in range(n_q):
            s = ref[m][qi]
            order = ranking(s)
            n_ties += len(s) - len(np.unique(s))
            np.testing.assert_array_equal(got[m].topk_index[qi], order[:5], err_msg=f"{m} query {qi}")
            np.testing.assert_array_equal(got[m].topk_score[qi], s[order[:5]].astype(np.float32))
            want = 0 if gt[qi] < 0 else 1 + int(np.flatnonzero(order == gt[qi])[0])
            assert got[m].gt_rank[qi] == want, (m, qi)
            # the rule spelled out: 1 + #(score > s_gt) + #(score == s_gt and index < gt)
            if gt[qi] >= 0:
                sg = s[gt[qi]]
                assert want == 1 + (s > sg).sum() + ((s == sg) & (np.arange(n_a) < gt[qi])).sum()
    assert n_ties > 100  # the duplicates (and coarse values) really produce ties


def test_audio_modes_without_whole_embeddings():
    rng = np.random.default_rng(4)
    queries, audios = make(rng, n_q=4, n_a=5)
    audios.whole_emb = None
    audio_modes = [m for m in MODES if m.startswith("audio-")]
    got = score(queries, audios, modes=audio_modes, top_k=5, query_block=2, chunk_block=4)
    ref = brute_force(queries, audios)
    for m in audio_modes:
        for qi in range(4):
            np.testing.assert_array_equal(got[m].topk_index[qi], ranking(ref[m][qi]))


def test_errors():
    rng = np.random.default_rng(6)
    queries, audios = make(rng, n_q=3, n_a=4)
    with pytest.raises(LarcqError, match=r"unknown scoring mode.*'audio-mean'.*valid modes: none, audio-max"):
        score(queries, audios, modes=["none", "audio-mean"])
    no_whole = AudioEmbeddings(audios.audio_ids, audios.chunk_emb, audios.chunk_offsets, None)
    with pytest.raises(LarcqError, match="none.*need whole-file audio embeddings"):
        score(queries, no_whole, modes=["none"])
    with pytest.raises(LarcqError, match="query-sum.*whole-file"):
        score(queries, no_whole, modes=["audio-max", "query-sum"])
    short = QueryEmbeddings(queries.query_ids, queries.whole_emb[:, :8], queries.chunk_emb[:, :8],
                            queries.chunk_offsets)
    with pytest.raises(LarcqError, match="dimension mismatch.*dimension 8, expected 16"):
        score(short, audios)
    bad_off = AudioEmbeddings(audios.audio_ids, audios.chunk_emb, audios.chunk_offsets[:-1], audios.whole_emb)
    with pytest.raises(LarcqError, match="audio chunk_offsets must be 5 integers"):
        score(queries, bad_off)
    empty_audio = audios.chunk_offsets.copy()
    empty_audio[1] = 0
    with pytest.raises(LarcqError, match="at least one chunk"):
        score(queries, AudioEmbeddings(audios.audio_ids, audios.chunk_emb, empty_audio, audios.whole_emb))
    with pytest.raises(LarcqError, match="gt_index"):
        score(queries, audios, gt_index=np.array([0, 1, 4]))
    nan = queries.whole_emb.copy()
    nan[0, 0] = np.nan
    with pytest.raises(LarcqError, match="NaN"):
        score(QueryEmbeddings(queries.query_ids, nan, queries.chunk_emb, queries.chunk_offsets), audios)
    with pytest.raises(LarcqError, match="top_k"):
        score(queries, audios, top_k=0)


def test_block_plan_bounds_size_and_padding():
    counts = np.sort(np.random.default_rng(7).integers(1, 40, 500))
    blocks = _plan_blocks(counts, 64)
    assert blocks[0].start == 0 and blocks[-1].stop == len(counts)
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    for blk in blocks:
        c = counts[blk.start:blk.stop]
        assert blk.kmax == c.max()
        assert len(c) * blk.kmax <= 64 or len(c) == 1
        assert len(c) * blk.kmax - c.sum() <= 0.25 * len(c) * blk.kmax + blk.kmax


@pytest.mark.parametrize("half", [False, True])
def test_candidate_scorer_equals_brute_force_on_each_subset(half):
    """CandidateScorer (ANN re-scoring in a shard): query q scored against its own subset of audios
    gives the brute-force top-K of that subset on every mode (ties by audio index, dyadic values so
    ties are real), and counts the subset's audios that beat a ground truth scored elsewhere."""
    rng = np.random.default_rng(11)
    n_a, n_q = 20, 9
    counts = rng.integers(1, 5, n_a)
    chunks = _dyadic(rng, int(counts.sum()))
    audios = AudioEmbeddings([f"a{i}" for i in range(n_a)], chunks.astype(np.float16) if half else chunks,
                             _offsets(counts), _dyadic(rng, n_a))
    qc = rng.integers(1, 4, n_q)
    queries = QueryEmbeddings([f"q{i}" for i in range(n_q)], _dyadic(rng, n_q), _dyadic(rng, int(qc.sum())),
                              _offsets(qc))
    subsets = [np.sort(rng.choice(n_a, int(rng.integers(1, n_a + 1)), replace=False)) for i in range(n_q)]
    subsets[0] = np.empty(0, np.int64)  # no candidate here: an empty, padded list
    ref = brute_force(queries, audios)
    # a ground truth per query (its score taken from the whole set), in or out of the subset
    gt = rng.integers(0, n_a, n_q)
    gt_score = {m: np.array([ref[m][i, gt[i]] for i in range(n_q)], dtype=np.float32) for m in MODES}
    gt_score[MODES[0]][3] = np.nan  # a query without ground truth counts nothing
    inside = [i for i in range(n_q) if gt[i] in subsets[i]]
    for m in MODES:  # a ground truth scored a little lower elsewhere: it would beat itself, unless excluded
        gt_score[m][inside[0]] -= 0.125
    pos = np.array([np.searchsorted(s, g) for s, g in zip(subsets, gt)])
    exclude = np.array([p if p < len(s) and s[p] == g else -1 for s, g, p in zip(subsets, gt, pos)])
    # gt_pos and exclude are indices among all audios here (the subset holds global indices)
    cs = scoring.CandidateScorer(audios)
    top_i, top_s, above = cs.score(queries, subsets, list(MODES), 4, gt_score=gt_score, gt_pos=gt,
                                   exclude=np.where(exclude >= 0, gt, -1))
    n_ties = 0
    for m in MODES:
        for i, sub in enumerate(subsets):
            s = ref[m][i][sub]
            order = ranking(s)[:4]
            n_ties += len(s) - len(np.unique(s))
            k = len(order)
            np.testing.assert_array_equal(top_i[m][i, :k], sub[order], err_msg=f"{m} query {i}")
            np.testing.assert_array_equal(top_s[m][i, :k], s[order].astype(np.float32))
            assert (top_i[m][i, k:] == -1).all() and np.isneginf(top_s[m][i, k:]).all()
            g = gt_score[m][i]
            beat = ((s > g) | ((s == g) & (sub < gt[i]))) & (sub != gt[i])  # the ground truth never counts
            want = 0 if np.isnan(g) else int(beat.sum())
            assert above[m][i] == want, (m, i)
    assert n_ties > 50 and len(inside) > 1


def test_candidate_scorer_refuses_bad_audios_once():
    rng = np.random.default_rng(1)
    queries, audios = make(rng)
    bad = AudioEmbeddings(audios.audio_ids, audios.chunk_emb.copy(), audios.chunk_offsets, audios.whole_emb)
    bad.chunk_emb[3, 0] = np.nan
    with pytest.raises(LarcqError, match="audio chunk embeddings contain NaN"):
        scoring.CandidateScorer(bad)
    cs = scoring.CandidateScorer(AudioEmbeddings(audios.audio_ids, audios.chunk_emb, audios.chunk_offsets, None))
    with pytest.raises(LarcqError, match="need whole-file"):
        cs.score(queries, [np.arange(3)] * 11, ["none"], 2)
    with pytest.raises(LarcqError, match="candidate lists"):
        cs.score(queries, [np.arange(3)] * 2, ["audio-max"], 2)


def test_candidate_benchmark_runs_and_agrees_with_the_baseline():
    """benchmarks/bench_candidates.py at a small size: it exits 1 when CandidateScorer's top 10 differ
    from score() on each query's gathered candidates, so this also checks they agree on random data."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_candidates.py"
    p = subprocess.run([sys.executable, str(script), "--chunks", "20000", "--queries", "6", "--candidates", "50",
                        "--dim", "32"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("candidates: chunks=") and "speedup=" in last, last
