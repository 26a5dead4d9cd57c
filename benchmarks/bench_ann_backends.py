"""Lance's IVF_PQ against FAISS's IVF-PQ on the same clustered chunk embeddings (the index decision).

Synthetic CLAP-like data: each audio has a few event centroids, its chunks are noisy copies of
them (unit vectors, 512 dims); queries are noisy copies of event centroids. Both libraries get the
same partitions, sub-vectors and probes; recall@10 is over chunk neighbours against exact search.
Lance is not a project dependency: run this with a Python that has `pylance` and `faiss-cpu`:

    python3 -m venv /tmp/lv && /tmp/lv/bin/pip install pylance faiss-cpu numpy
    /tmp/lv/bin/python benchmarks/bench_ann_backends.py --chunks 200000

Last line: `ann_backends: chunks=N lance_build_s=A faiss_build_s=B lance_query_ms=C faiss_query_ms=D
lance_recall10=E faiss_recall10=F`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np


def clustered(n_chunks: int, dim: int, seed: int = 0, chunks_per_audio: int = 36, events: int = 4):
    rng = np.random.default_rng(seed)
    n_aud = max(1, -(-n_chunks // chunks_per_audio))
    cent = rng.standard_normal((n_aud, events, dim)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=-1, keepdims=True)
    aud = np.repeat(np.arange(n_aud), chunks_per_audio)[:n_chunks]
    ev = rng.integers(0, events, size=n_chunks)
    x = cent[aud, ev] + 0.35 * rng.standard_normal((n_chunks, dim)).astype(np.float32) / np.sqrt(dim) * 4
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), cent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--partitions", type=int, default=256)
    ap.add_argument("--sub-vectors", type=int, default=64)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import faiss
    import lance
    import pyarrow as pa

    faiss.omp_set_num_threads(a.threads)
    x, cent = clustered(a.chunks, a.dim)
    rng = np.random.default_rng(1)
    q = cent.reshape(-1, a.dim)[rng.choice(cent.shape[0] * cent.shape[1], a.queries, replace=False)]
    q = q + 0.2 * rng.standard_normal(q.shape).astype(np.float32) / np.sqrt(a.dim) * 4
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]

    def recall(found):
        return float(np.mean([len(set(f[:10]) & set(e)) / 10 for f, e in zip(found, exact)]))

    # FAISS: inner product on unit vectors = cosine.
    t0 = time.time()
    fi = faiss.index_factory(a.dim, f"IVF{a.partitions},PQ{a.sub_vectors}", faiss.METRIC_INNER_PRODUCT)
    fi.train(x[rng.choice(len(x), min(len(x), 256 * a.partitions), replace=False)])
    fi.add(x)
    faiss_build = time.time() - t0
    fi.nprobe = a.nprobe
    t0 = time.time()
    fids = [fi.search(v[None], 10)[1][0] for v in q]  # one query at a time, as Lance is called below
    faiss_ms = (time.time() - t0) / len(q) * 1000

    tmp = tempfile.mkdtemp()
    try:
        vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), a.dim)
        ds = lance.write_dataset(pa.table({"id": pa.array(np.arange(len(x))), "vector": vec}), f"{tmp}/d.lance")
        t0 = time.time()
        ds.create_index("vector", index_type="IVF_PQ", num_partitions=a.partitions, num_sub_vectors=a.sub_vectors,
                        metric="cosine")
        lance_build = time.time() - t0
        ds = lance.dataset(f"{tmp}/d.lance")
        lids = []
        t0 = time.time()
        for v in q:
            t = ds.to_table(nearest={"column": "vector", "q": v, "k": 10, "nprobes": a.nprobe}, columns=["id"])
            lids.append(t.column("id").to_numpy())
        lance_ms = (time.time() - t0) / len(q) * 1000
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'library':>8} {'build s':>8} {'query ms':>9} {'recall@10':>10}")
    print(f"{'lance':>8} {lance_build:>8.1f} {lance_ms:>9.2f} {recall(lids):>10.3f}")
    print(f"{'faiss':>8} {faiss_build:>8.1f} {faiss_ms:>9.2f} {recall(fids):>10.3f}")
    print(f"ann_backends: chunks={a.chunks} lance_build_s={lance_build:.1f} faiss_build_s={faiss_build:.1f} "
          f"lance_query_ms={lance_ms:.2f} faiss_query_ms={faiss_ms:.2f} lance_recall10={recall(lids):.3f} "
          f"faiss_recall10={recall(fids):.3f}")


if __name__ == "__main__":
    main()
