"""Search at scale: sharded exact search against a bare matmul, and ANN (FAISS) recall and speed-up.

    python benchmarks/bench_scale.py [--chunks 1000000] [--queries 100] [--dim 512]
        [--shard-chunks N] [--factory auto] [--nprobe 32 ...] [--candidates 256 ...] [--rescore 0 ...]
        [--out /tmp/bench_scale]
        [--reuse-ann]

Synthetic CLUSTERED embeddings, written as a real index through the store API by Ray tasks
(IndexStore.write_chunk_part + commit, float16 on disk): a vocabulary of event prototypes; each audio
takes a few events, its own variant of each (prototype + noise), and each of its chunks is one of its
events plus noise (unit vectors). A query is built from a target audio's events: the whole query
from their sum, one query chunk per event, each with noise, so the target is findable but not trivial.

Measured, on the same machine:
- exact: `ShardSet.search` over live shard actors (one thread each; shard_num_cpus 1, or CPUs / shards
  when there are more shards than CPUs), holding the float16 embeddings as stored, mode
  audio-max+query-sum, top 10; against `matmul`: a bare torch matmul of the same shapes in the same
  blocks (each query block's chunk rows x each chunk block), in one Ray task with as many threads as
  the shard actors together. exact_over_matmul = exact / matmul.
- ann: the FAISS index built by the Ray job (build_ann), then candidates + exact re-scoring on the same
  live shard actors; ann_recall10 = mean |ANN top-10 ∩ exact top-10| / 10; ann_speedup = exact / ann.
  With several --nprobe / --candidates values every pair is measured and printed; the last line
  reports the fastest pair with recall >= 0.95 (else the most accurate one).
- driver_peak_gib: peak RSS of this process (resource.getrusage), which never loads embeddings.
The index is kept in --out and reused when its chunk count, dim and seed match.
Last line: `scale: chunks=N exact_over_matmul=X ann_recall10=Y ann_speedup=Z driver_peak_gib=W`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODE = "audio-max+query-sum"


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _noise(rng, shape, sigma):
    return rng.standard_normal(shape, dtype=np.float32) * (sigma / np.sqrt(shape[-1]))


def _audio_events(seed: int, a: int, protos: np.ndarray, n_events: int):
    """(event prototype ids, this audio's variant of each) for audio a: the same on every call."""
    rng = np.random.default_rng([seed, a])
    ev = rng.choice(len(protos), n_events, replace=False)
    return ev, _unit(protos[ev] + _noise(rng, (n_events, protos.shape[1]), 0.8))


def write_range(uri: str, seed: int, a0: int, a1: int, counts: np.ndarray, protos: np.ndarray, n_events: int,
                part_chunks: int, targets: np.ndarray):
    """A Ray task: audios [a0, a1) as chunk parts; returns their file rows and the targets' queries."""
    from larcq_ray.index.store import IndexStore

    store = IndexStore(uri)
    dim = protos.shape[1]
    files, queries = [], {}
    ids, cidx, embs = [], [], []
    pending: list[dict] = []

    def flush():
        if not ids:
            return
        emb = np.concatenate(embs)
        table = pa.table({"audio_id": pa.array(ids, pa.string()), "chunk_index": pa.array(cidx, pa.int32()),
                          "start_s": pa.array(np.asarray(cidx, np.float64) * 10.0),
                          "end_s": pa.array(np.asarray(cidx, np.float64) * 10.0 + 10.0),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
                          .cast(pa.list_(pa.float32()))})
        name = store.write_chunk_part(table)
        for f in pending:
            f["chunk_parts"] = [name]
        files.extend(pending)
        ids.clear(), cidx.clear(), embs.clear(), pending.clear()

    for a in range(a0, a1):
        ev, var = _audio_events(seed, a, protos, n_events)
        rng = np.random.default_rng([seed, a, 1])
        c = int(counts[a])
        which = rng.integers(0, n_events, c)
        embs.append(_unit(var[which] + _noise(rng, (c, dim), 0.6)))
        aid = f"audio_{a:09d}.wav"
        ids.extend([aid] * c)
        cidx.extend(range(c))
        pending.append({"audio_id": aid, "duration_s": 10.0 * c, "sample_rate": 48000, "channels": 1,
                        "n_chunks": c, "status": "ok"})
        for qi in np.flatnonzero(targets == a).tolist():
            qr = np.random.default_rng([seed, a, 2, qi])
            queries[qi] = (_unit(var.sum(0, keepdims=True) + _noise(qr, (1, dim), 0.8))[0],
                           _unit(var + _noise(qr, var.shape, 0.8)))
        if len(ids) >= part_chunks:
            flush()
    flush()
    return files, queries


def build_index(out: Path, n_chunks: int, n_queries: int, dim: int, seed: int, n_events: int, n_protos: int):
    import ray

    from larcq_ray.index.store import IndexStore

    meta_path = out / "bench_meta.json"
    want = {"chunks": n_chunks, "dim": dim, "seed": seed, "queries": n_queries, "events": n_events}
    if meta_path.exists() and json.loads(meta_path.read_text()).get("want") == want:
        saved = json.loads(meta_path.read_text())
        q = np.load(out / "queries.npz")
        return IndexStore(out / "index"), (q["whole"], q["chunks"], q["offsets"]), saved["targets"], 0.0
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 16, n_chunks // 5 + 10)  # 5-15 chunks an audio (10 s each)
    n_aud = int(np.searchsorted(np.cumsum(counts), n_chunks)) + 1
    counts = counts[:n_aud]
    counts[-1] -= int(counts.sum() - n_chunks)
    if counts[-1] < 1:
        counts[-2] += counts[-1] - 1
        counts[-1] = 1
    protos = _unit(rng.standard_normal((n_protos, dim), dtype=np.float32))
    targets = np.sort(rng.choice(n_aud, n_queries, replace=False))
    store = IndexStore(out / "index")
    store.open_for_write({"model": "synthetic", "sample_rate": 48000, "chunking": {}, "whole_file": False,
                          "embedding_dtype": "float16"})
    task = ray.remote(write_range).options(num_cpus=1)
    per_task = max(1, n_aud // max(8, n_chunks // 250_000))
    counts_ref, protos_ref, targets_ref = ray.put(counts), ray.put(protos), ray.put(targets)
    refs = [task.remote(store.uri, seed, a, min(a + per_task, n_aud), counts_ref, protos_ref, n_events, 50_000,
                        targets_ref) for a in range(0, n_aud, per_task)]
    queries = {}
    while refs:  # commit each task's files as it finishes: the driver holds one batch of rows at a time
        done, refs = ray.wait(refs, num_returns=1)
        files, q = ray.get(done[0])
        store.commit(files)
        queries.update(q)
        del files
    whole = np.stack([queries[i][0] for i in range(n_queries)])
    chunks = np.concatenate([queries[i][1] for i in range(n_queries)])
    offsets = np.arange(n_queries + 1, dtype=np.int64) * n_events
    np.savez(out / "queries.npz", whole=whole, chunks=chunks, offsets=offsets)
    ids = [f"audio_{a:09d}.wav" for a in targets.tolist()]
    meta_path.write_text(json.dumps({"want": want, "targets": ids}))
    return store, (whole, chunks, offsets), ids, time.perf_counter() - t0


def bare_matmul(n_chunks: int, dim: int, q_rows: list[int], chunk_block: int, threads: int) -> float:
    """Seconds of the scorer's grid matmuls with nothing around them: each query block's chunk rows
    against each block of chunk_block chunks (a random block, reused: the same shapes)."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(chunk_block, dim, generator=g)
    blocks = [chunk_block] * (n_chunks // chunk_block) + ([n_chunks % chunk_block] if n_chunks % chunk_block else [])
    qs = [torch.randn(r, dim, generator=g) for r in q_rows]
    with torch.inference_mode():
        (qs[0] @ e[:1024].T).sum()  # warm-up
        t0 = time.perf_counter()
        for q in qs:
            for n in blocks:
                q @ e[:n].T
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--events", type=int, default=3)
    ap.add_argument("--protos", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-chunks", type=int, default=None, help="default: about chunks / CPUs (a shard per CPU)")
    ap.add_argument("--chunk-block", type=int, default=65536)
    ap.add_argument("--factory", default="auto")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[32], help="one or more: every (nprobe, candidates) "
                    "pair is measured")
    ap.add_argument("--candidates", type=lambda v: v if v == "auto" else int(v), nargs="+", default=["auto"],
                    help="chunks fetched per query row (search.ann.candidates: a number or auto); one or more")
    ap.add_argument("--rescore", type=int, nargs="+", default=[0], help="candidate audios re-scored exactly per query "
                    "(search.ann.rescore; 0: all); one or more")
    ap.add_argument("--train-sample", type=int, default=100_000)
    ap.add_argument("--out", default="/tmp/bench_scale")
    ap.add_argument("--reuse-ann", action="store_true", help="keep an up-to-date ANN index of an earlier run "
                    "(and report that run's build time)")
    ap.add_argument("--address", default=None)
    args = ap.parse_args()

    import ray

    from larcq_ray.search.ann import AnnSearcher, ann_state, build_ann, ensure_ann, resolve_candidates
    from larcq_ray.search.config import AnnConfig
    from larcq_ray.search.scoring import QueryEmbeddings
    from larcq_ray.search.sharded import ShardOptions, ShardSet
    from larcq_ray.search.shards import plan_shards

    ray.init(address=args.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    out = Path(args.out) / f"c{args.chunks}_d{args.dim}"
    store, (qw, qc, qo), target_ids, gen_s = build_index(out, args.chunks, args.queries, args.dim, args.seed,
                                                         args.events, args.protos)
    queries = QueryEmbeddings([str(i) for i in range(args.queries)], qw, qc, qo)
    files = store.ok_files()
    n_chunks = int(files.column("n_chunks").to_numpy().sum())
    # one shard per CPU (+ one part of slack: shards are whole parts)
    shard_chunks = args.shard_chunks or -(-n_chunks // cpus) + 50_000
    print(f"index: {files.num_rows} audios, {n_chunks} chunks, dim {args.dim}, float16 on disk "
          f"({'written in %.1f s' % gen_s if gen_s else 'reused'}); {cpus} CPUs")

    # ANN build (Ray job) first: it needs the CPUs the shard actors hold afterwards
    ann_cfg = AnnConfig(factory=args.factory, nprobe=args.nprobe[0], candidates=args.candidates[0],
                        train_sample=args.train_sample)
    saved = out / f"ann_build_{args.factory}_{args.train_sample}.json"
    state, meta = ann_state(store, ann_cfg.name, files)
    if args.reuse_ann and state == "ok" and saved.exists() and json.loads(saved.read_text())["factory"] == \
            meta["factory"]:
        build_s = json.loads(saved.read_text())["build_s"]
        print(f"ann build: {meta['factory']}, {meta['n_rows']} rows, {build_s:.1f} s (an earlier run's; reused)")
    else:
        t0 = time.perf_counter()
        meta = build_ann(store.uri, ann_cfg, shard_chunks, num_cpus=1)
        build_s = time.perf_counter() - t0
        saved.write_text(json.dumps({"factory": meta["factory"], "build_s": build_s}))
        print(f"ann build: {meta['factory']}, {meta['n_rows']} rows, {build_s:.1f} s")
    ensure_ann(store.uri, ann_cfg, files, shard_chunks)  # up to date: no rebuild

    t0 = time.perf_counter()
    # more shards than CPUs (10M chunks on 2 CPUs): each actor takes its share of the CPUs, one thread each
    shard_cpus = min(1.0, int(1000 * cpus / len(plan_shards(files, shard_chunks))) / 1000)  # rounded down: all fit
    shards = ShardSet(store.uri, ShardOptions(shard_chunks=shard_chunks, num_cpus=shard_cpus, num_gpus=0, device="cpu",
                                              chunk_block=args.chunk_block), persistent=True, files=files)
    print(f"shards: {len(shards.shards)} actors ({shard_cpus:g} CPU each) loaded in {time.perf_counter() - t0:.1f} s; "
          f"embeddings held as {store.embedding_dtype()}")
    shards.search(queries, [MODE], top_k=10)  # warm-up (first-call allocations)
    exact_s, exact = float("inf"), None
    for _ in range(2):
        t0 = time.perf_counter()
        exact = shards.search(queries, [MODE], top_k=10)[MODE]
        exact_s = min(exact_s, time.perf_counter() - t0)

    # the bare matmul, on the same CPUs (the shard actors idle meanwhile)
    q_rows = [int(qo[min(s + 256, args.queries)] - qo[s]) for s in range(0, args.queries, 256)]
    mm = ray.remote(bare_matmul).options(num_cpus=0)
    matmul_s = min(ray.get(mm.remote(n_chunks, args.dim, q_rows, args.chunk_block, cpus)) for _ in range(2))

    ann_actor = ray.remote(AnnSearcher).options(num_cpus=0).remote(store.uri, ann_cfg.name, files.column("audio_id"),
                                                                    ann_cfg.nprobe)
    ray.get(ann_actor.ntotal.remote())
    settings = []  # (nprobe, candidates, rescore, seconds, recall, audios re-scored a query)
    for nprobe in args.nprobe:
        ray.get(ann_actor.set_nprobe.remote(nprobe))
        for n_fetch in [resolve_candidates(c, n_chunks) for c in args.candidates]:
            for rescore in args.rescore:
                ann_s, ann = float("inf"), None
                for _ in range(2):
                    t0 = time.perf_counter()
                    cands = ray.get(ann_actor.candidates.remote(qw, qc, qo, n_fetch, rescore))
                    ann = shards.search(queries, [MODE], top_k=10, candidates=cands)[MODE]
                    ann_s = min(ann_s, time.perf_counter() - t0)
                k = min(10, exact.topk_index.shape[1], ann.topk_index.shape[1])
                recall = float(np.mean([len(set(a[:k]) & set(e[:k])) / k
                                        for a, e in zip(ann.topk_index, exact.topk_index)]))
                settings.append((nprobe, n_fetch, rescore, ann_s, recall, float(np.mean([len(c) for c in cands]))))
                print(f"ann nprobe {nprobe:4d}, {n_fetch:5d} chunks a query row, rescore {rescore:5d}: {ann_s:6.2f} s, "
                      f"{settings[-1][5]:7.0f} audios re-scored a query, recall@10 {recall:.3f}, "
                      f"speed-up {exact_s / ann_s:.1f}x", flush=True)
    # the reported setting: the fastest that meets the recall target, else the most accurate
    good = [x for x in settings if x[4] >= 0.95]
    nprobe, n_fetch, rescore, ann_s, recall, n_cand = min(good, key=lambda x: x[3]) if good else \
        max(settings, key=lambda x: x[4])
    ids = shards.audio_ids
    hit = float(np.mean([t in {ids[j] for j in row[:10]} for t, row in zip(target_ids, exact.topk_index)]))
    driver_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    shards.close()

    ratio = exact_s / matmul_s
    print(f"exact sharded search: {exact_s:.2f} s for {args.queries} queries ({MODE}, top 10); bare matmul of the "
          f"same blocks: {matmul_s:.2f} s -> exact_over_matmul {ratio:.2f} (target <= 1.5)")
    print(f"the targets in exact top 10: {hit:.2f}")
    print(f"ann: {ann_s:.2f} s ({n_cand:.0f} audios re-scored a query of {files.num_rows}; nprobe {nprobe}, "
          f"{n_fetch} chunks a query row, rescore {rescore}) -> speed-up {exact_s / ann_s:.1f}x; recall@10 vs exact {recall:.3f} "
          f"(target >= 0.95); build {build_s:.1f} s")
    print(f"driver peak RSS: {driver_gib:.2f} GiB; os: {os.uname().sysname}")
    print(f"scale: chunks={n_chunks} exact_over_matmul={ratio:.2f} ann_recall10={recall:.3f} "
          f"ann_speedup={exact_s / ann_s:.1f} driver_peak_gib={driver_gib:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
