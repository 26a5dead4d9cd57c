"""Vectorized vote scoring vs the research code's per-query, per-audio loop, and vs one bare matmul.

    python benchmarks/bench_scoring.py [--queries 1000 --audios 1000 --chunks 10 --query-chunks 5
                                        --dim 512 --loop-queries 20 --top-k 100]

Prints figures; asserts the vectorized rankings equal the loop's on the looped slice.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from larcq_ray.search.scoring import MODES, AudioEmbeddings, QueryEmbeddings, score


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def best_of(n: int, f) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t0)
    return best, out


def loop_scores(queries: QueryEmbeddings, audios: AudioEmbeddings, n_q: int) -> dict[str, np.ndarray]:
    """The research code's shape: for each query, for each audio, a (query chunks x audio chunks)
    similarity in torch, reduced per mode; returns {mode: (n_q, A) scores}."""
    n_a = len(audios.audio_ids)
    qw = torch.from_numpy(queries.whole_emb)
    qc = [torch.from_numpy(queries.chunk_emb[queries.chunk_offsets[i]:queries.chunk_offsets[i + 1]]) for i in range(n_q)]
    ac = [torch.from_numpy(audios.chunk_emb[audios.chunk_offsets[a]:audios.chunk_offsets[a + 1]]) for a in range(n_a)]
    aw = torch.from_numpy(audios.whole_emb)
    out = {m: np.zeros((n_q, n_a), dtype=np.float32) for m in MODES}
    for i in range(n_q):
        rows = {m: [] for m in MODES}
        for a in range(n_a):
            grid = qc[i] @ ac[a].T  # (query chunks, audio chunks)
            whole_vs_chunks = ac[a] @ qw[i]
            chunks_vs_whole = qc[i] @ aw[a]
            rows["none"].append(float(qw[i] @ aw[a]))
            rows["audio-max"].append(float(whole_vs_chunks.max()))
            rows["audio-sum"].append(float(whole_vs_chunks.sum()))
            rows["query-max"].append(float(chunks_vs_whole.max()))
            rows["query-sum"].append(float(chunks_vs_whole.sum()))
            per_chunk = {"max": grid.max(dim=1).values, "sum": grid.sum(dim=1)}
            for x in ("max", "sum"):
                rows[f"audio-{x}+query-max"].append(float(per_chunk[x].max()))
                rows[f"audio-{x}+query-sum"].append(float(per_chunk[x].sum()))
        for m in MODES:
            out[m][i] = rows[m]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--audios", type=int, default=1000)
    p.add_argument("--chunks", type=int, default=10, help="chunks per audio")
    p.add_argument("--query-chunks", type=int, default=5, help="chunks per query")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--loop-queries", type=int, default=20, help="queries the slow loop runs on (then scaled); 0 skips the loop and the matmul comparison")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs for the vectorized timings")
    a = p.parse_args()

    rng = np.random.default_rng(0)
    nq, na, c, qcn, d = a.queries, a.audios, a.chunks, a.query_chunks, a.dim
    audios = AudioEmbeddings([f"a{i}" for i in range(na)], unit(rng, na * c, d),
                             np.arange(na + 1, dtype=np.int64) * c, unit(rng, na, d))
    queries = QueryEmbeddings([f"q{i}" for i in range(nq)], unit(rng, nq, d), unit(rng, nq * qcn, d),
                              np.arange(nq + 1, dtype=np.int64) * qcn)
    gt = np.arange(nq, dtype=np.int64) % na
    print(f"shape: {nq} queries x {qcn} chunks, {na} audios x {c} chunks, dim {d}, top_k {a.top_k}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux reports KiB)
    t_all, res = best_of(a.repeats, lambda: score(queries, audios, MODES, top_k=a.top_k, gt_index=gt))
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"vectorized scorer, all {len(MODES)} modes (best of {a.repeats}): {t_all:.3f} s; "
          f"process peak RSS {rss_peak:.2f} GiB (was {rss_before:.2f} GiB before scoring; "
          f"{(audios.chunk_emb.nbytes + queries.chunk_emb.nbytes) / 2**30:.2f} GiB of embeddings)")
    if a.loop_queries <= 0:  # scale run: no loop, no matmul comparison
        return
    t_one, _ = best_of(a.repeats, lambda: score(queries, audios, ["audio-max+query-sum"], top_k=a.top_k, gt_index=gt))

    lq = min(a.loop_queries, nq)
    t0 = time.perf_counter()
    ref = loop_scores(queries, audios, lq)
    ref_order = {m: np.argsort(-ref[m], axis=1, kind="stable") for m in MODES}  # the loop's "sort"
    t_loop = (time.perf_counter() - t0) * nq / lq

    # Rankings must agree; a swapped pair is accepted only if the loop itself scores it as a float near-tie.
    k = res[MODES[0]].topk_index.shape[1]
    exact, near = 0, 0
    for m in MODES:
        got = res[m].topk_index[:lq]
        want = ref_order[m][:, :k]
        exact += int((got == want).all(axis=1).sum())
        bad = ~(got == want).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            by_got = np.take_along_axis(ref[m][rows], got[rows], 1)
            by_want = np.take_along_axis(ref[m][rows], want[rows], 1)
            scale = max(1.0, float(np.abs(ref[m]).max()))
            assert np.allclose(by_got, by_want, rtol=0, atol=2e-6 * scale), f"{m}: rankings differ beyond float ties"
            near += len(rows)
        np.testing.assert_allclose(res[m].topk_score[:lq], np.take_along_axis(ref[m], want, 1), rtol=1e-4, atol=1e-5)
    total = lq * len(MODES)

    x = torch.from_numpy(unit(rng, nq * qcn, d))
    y = torch.from_numpy(unit(rng, na * c, d)).T
    with torch.inference_mode():
        torch.matmul(x, y)  # warm-up, untimed
        t_mm, _ = best_of(3, lambda: torch.matmul(x, y))

    print(f"vectorized scorer, audio-max+query-sum only (best of {a.repeats}): {t_one:.3f} s")
    print(f"per-query/per-audio loop, all {len(MODES)} modes: {t_loop:.1f} s "
          f"(ran {lq} of {nq} queries, scaled linearly to {nq})")
    print(f"rankings on the looped slice: {exact}/{total} (query, mode) top-{k} lists identical, "
          f"{near} differ only by float near-ties")
    print(f"speed-up over the loop: {t_loop / t_all:.0f}x (all modes)")
    print(f"bare torch.matmul ({nq * qcn}x{d}) @ ({d}x{na * c}) (best of 3): {t_mm:.3f} s")
    for name, t in (("all modes", t_all), ("audio-max+query-sum", t_one)):
        r = t / t_mm
        print(f"scorer / matmul, {name}: {r:.2f}x -> {'within' if r <= 2 else 'NOT within'} 2x")


if __name__ == "__main__":
    main()
