"""Exact re-scoring of ANN candidates in one shard: CandidateScorer against the general scorer per query.

One shard held in memory as search holds it (float16 chunk embeddings, 5-15 chunks an audio), Q queries
of 3 chunks, each with C random candidate audios. The baseline, measured in the same run, is what
ShardScorer.search_candidates did before CandidateScorer: gather each query's candidates into a new
AudioEmbeddings and call score() on it. Both must give the same top 10; the script fails otherwise.

    .venv/bin/python benchmarks/bench_candidates.py                      # 1M chunks, 100 queries, 400 candidates

Last line: `candidates: chunks=N queries=Q per_query=C baseline_s=X candidate_scorer_s=Y speedup=Z check_s=W`
(check_s: CandidateScorer's one-time check of the shard, paid once per shard, not per call).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODE = "audio-max+query-sum"


def subset(audios, local: np.ndarray):
    """The baseline's gather: the audios at `local` as a new AudioEmbeddings."""
    from larcq_ray.search.scoring import AudioEmbeddings

    off = audios.chunk_offsets
    cnt = off[local + 1] - off[local]
    starts = np.cumsum(cnt) - cnt
    rows = np.repeat(off[local] - starts, cnt) + np.arange(int(cnt.sum()))
    return AudioEmbeddings([audios.audio_ids[i] for i in local.tolist()], audios.chunk_emb[rows],
                           np.concatenate([[0], np.cumsum(cnt)]).astype(np.int64), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--candidates", type=int, default=400, help="candidate audios a query (in this shard)")
    ap.add_argument("--dim", type=int, default=512)
    a = ap.parse_args()

    import torch

    from larcq_ray.search.scoring import AudioEmbeddings, CandidateScorer, QueryEmbeddings, score

    torch.set_num_threads(1)  # as a shard actor with one CPU
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 16, a.chunks // 5)
    counts = counts[: int(np.searchsorted(np.cumsum(counts), a.chunks)) + 1]
    n = int(counts.sum())
    emb = np.empty((n, a.dim), dtype=np.float16)
    for s in range(0, n, 65536):  # generated in slices: one float32 copy of the shard would not be small
        x = rng.standard_normal((min(65536, n - s), a.dim), dtype=np.float32)
        emb[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    audios = AudioEmbeddings([f"a{i:07d}" for i in range(len(counts))], emb,
                             np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), None)
    qc = rng.standard_normal((3 * a.queries, a.dim), dtype=np.float32)
    qw = rng.standard_normal((a.queries, a.dim), dtype=np.float32)
    queries = QueryEmbeddings([str(i) for i in range(a.queries)], qw / np.linalg.norm(qw, axis=1, keepdims=True),
                              qc / np.linalg.norm(qc, axis=1, keepdims=True),
                              np.arange(a.queries + 1, dtype=np.int64) * 3)
    local = [np.sort(rng.choice(len(counts), a.candidates, replace=False)) for _ in range(a.queries)]
    print(f"shard: {len(counts)} audios, {n} chunks, dim {a.dim}, float16; {a.queries} queries x {a.candidates} "
          "candidates", flush=True)

    def baseline():
        out = []
        with torch.inference_mode():
            for q in range(a.queries):
                one = QueryEmbeddings([str(q)], qw[q:q + 1], queries.chunk_emb[3 * q:3 * q + 3],
                                      np.array([0, 3], dtype=np.int64))
                r = score(one, subset(audios, local[q]), [MODE], top_k=10, query_block=1)[MODE]
                out.append(local[q][r.topk_index[0]])
        return np.stack(out)

    t0 = time.perf_counter()
    cs = CandidateScorer(audios)
    check_s = time.perf_counter() - t0
    times = {"baseline": [], "candidate_scorer": []}
    for _ in range(2):  # alternated, the better of two each
        t0 = time.perf_counter()
        want = baseline()
        times["baseline"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = cs.score(queries, local, [MODE], 10)[0][MODE]
        times["candidate_scorer"].append(time.perf_counter() - t0)
    if not np.array_equal(got, want):
        print("candidate scorer and baseline disagree", file=sys.stderr)
        return 1
    b, c = min(times["baseline"]), min(times["candidate_scorer"])
    print(f"baseline (gather + score() per query): {b:.3f} s; CandidateScorer: {c:.3f} s; same top 10; "
          f"one-time check of the shard {check_s:.2f} s")
    print(f"candidates: chunks={n} queries={a.queries} per_query={a.candidates} baseline_s={b:.3f} "
          f"candidate_scorer_s={c:.3f} speedup={b / c:.2f} check_s={check_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
