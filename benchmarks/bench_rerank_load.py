"""Load test of the /rerank Serve app: throughput and latency with server batching on vs off,
and the serving overhead: the service's throughput vs the backend's own.

    HF_HUB_OFFLINE=1 python benchmarks/bench_rerank_load.py [--backend bi-encoder|transformers]
        [--max-requests 200] [--max-seconds 30]

Backends: `bi-encoder` is the shipped MiniLM; `transformers` is the listwise backend on a random
Qwen2 of 4 layers x 256 built offline (its cost is what counts here, not its scores).
The server (Ray Serve + the backend) runs in this process's Ray session; the load
comes from a SECOND process (`--client`), so client work does not share the server's event loop.
Each request: one query, 10 documents, all texts unique per request (the backend de-duplicates
texts within a batch; repeated texts would flatter batching).

Serving overhead: right after the batching-on load (Serve still up but idle, so both figures see
the same machine), the same backend is built in THIS process (no Serve, no HTTP) and called directly on the same batches the service formed at the top level with batching
on (the batch sizes its responses reported, over fresh payloads of the same shape), with as many
torch threads as the replica had (Ray gives an actor OMP_NUM_THREADS = its num_cpus). The ratio
service req/s / direct req/s is the share of the backend's throughput the service delivers
(target >= 80%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

CAPTIONS = [
    "a dog barks loudly", "rain falls on a tin roof", "a car passes by on a wet street",
    "a high tone rings", "a low hum drones", "birds chirp in the morning", "a door creaks open",
    "white noise hisses", "a bell rings twice", "footsteps on gravel",
]


def _payload(k: int) -> dict:
    return {
        "query": f"a dog barking while rain falls, recording {k}",
        "documents": [f"{c}, clip {k}-{j}" for j, c in enumerate(CAPTIONS)],
        "return_documents": False,
    }


async def _level(url: str, clients: int, max_requests: int, max_seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    batch_sizes: dict[int, int] = {}  # server batch size -> responses that reported it
    errors = 0
    issued = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        for k in range(min(clients, 4)):  # warm-up: connections, first-batch costs
            await http.post("/rerank", json=_payload(-1 - k))

        async def worker() -> None:
            nonlocal issued, errors
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                r = await http.post("/rerank", json=_payload(issued))
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200
                if r.status_code == 200:
                    b = r.json()["usage"]["batch_size"]
                    batch_sizes[b] = batch_sizes.get(b, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {"clients": clients, "requests": len(latencies), "errors": errors, "wall_s": wall,
            "rps": len(latencies) / wall, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "batch_sizes": batch_sizes}


def client_main(url: str, levels: list[int], max_requests: int, max_seconds: float) -> None:
    for n in levels:
        print(json.dumps(asyncio.run(_level(url, n, max_requests, max_seconds))), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_load(url: str, levels: list[int], max_requests: int, max_seconds: float) -> list[dict]:
    cmd = [sys.executable, __file__, "--client", url, "--levels", ",".join(map(str, levels)),
           "--max-requests", str(max_requests), "--max-seconds", str(max_seconds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _backend_config(kind: str):
    from larcq_ray.rerank.config import RerankBackendConfig

    if kind == "bi-encoder":
        return RerankBackendConfig(kind="bi-encoder", device="cpu")
    import tempfile

    from larcq_ray.offline.tiny_lm import build_tiny_causal_lm

    texts = [c for k in range(50) for c in _payload(k)["documents"]]
    model = build_tiny_causal_lm(tempfile.mkdtemp(prefix="bench_lm_"), texts, hidden_size=256, num_layers=4)
    return RerankBackendConfig(kind="transformers", model=str(model), device="cpu")


def _batches_from_responses(batch_sizes: dict) -> list[int]:
    """The server batches behind the responses: a batch of b requests gives b responses saying b."""
    out: list[int] = []
    for b, n in sorted((int(b), n) for b, n in batch_sizes.items()):
        out += [b] * max(1, round(n / b))
    return out


def _direct_rps(backend, batches: list[int], max_seconds: float) -> dict:
    """The backend's own throughput on `batches` (sizes), called in this process."""

    def pairs(first: int, n: int) -> list:
        return [(p["query"], p["documents"]) for p in (_payload(first + i) for i in range(n))]

    for k in range(2):  # warm-up, like the client's
        backend.score(pairs(-10 - 40 * k, max(batches)))
    done, n, k = 0, 0, 100_000  # payload numbers the service never saw: no warm caches
    t0 = time.perf_counter()
    for b in batches:
        backend.score(pairs(k, b))
        k, done, n = k + b, done + b, n + 1
        if time.perf_counter() - t0 > max_seconds:
            break
    wall = time.perf_counter() - t0
    return {"requests": done, "batches": n, "wall_s": wall, "rps": done / wall}


def server_main(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from larcq_ray.rerank.app import run_server
    from larcq_ray.rerank.config import RerankServeConfig

    levels = [int(x) for x in args.levels.split(",")]
    backend = _backend_config(args.backend)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    port = _free_port()
    rows: dict[bool, list[dict]] = {}
    replica_cpus = 1.0
    threads = max(1, int(replica_cpus))  # what Ray gives the replica: OMP_NUM_THREADS = floor(num_cpus)
    try:
        for batching in (True, False):
            cfg = RerankServeConfig(backend=backend, port=port, batching=batching, max_batch_size=32,
                                    batch_wait_timeout_s=0.01, max_ongoing_requests=64, num_cpus=replica_cpus)
            url = run_server(cfg, blocking=False, app_name="bench-rerank")
            rows[batching] = _run_load(url, levels, args.max_requests, args.max_seconds)
            if batching:  # the serving-overhead baseline: the same batches, straight into the backend
                served = next(r for r in rows[True] if r["clients"] == max(levels))
                batches = _batches_from_responses(served["batch_sizes"])
                import torch

                from larcq_ray.rerank.backends import build_backend

                torch.set_num_threads(threads)
                model = build_backend(backend)
                direct = _direct_rps(model, batches, args.max_seconds)
                # For reference: full batches (what the backend could do if every batch filled).
                full = _direct_rps(model, [32] * max(1, sum(batches) // 32), args.max_seconds)
                del model
            serve.delete("bench-rerank")
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"{'batching':>8} {'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>8} "
          f"{'p50 ms':>8} {'p99 ms':>8}")
    for batching in (True, False):
        for r in rows[batching]:
            print(f"{'on' if batching else 'off':>8} {r['clients']:>7} {r['requests']:>8} "
                  f"{r['errors']:>6} {r['rps']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}")
    top = max(levels)
    on = next(r for r in rows[True] if r["clients"] == top)["rps"]
    off = next(r for r in rows[False] if r["clients"] == top)["rps"]
    print(f"{args.backend}: batching speed-up at {top} clients: {on / off:.2f}x (target >= 5x)")

    mean_batch = sum(batches) / len(batches)
    print(f"\nserving overhead at {top} clients (batching on; {len(batches)} server batches, mean size "
          f"{mean_batch:.1f}; direct: {direct['requests']} requests, {threads} torch thread(s) like the replica)")
    print(f"{'':>26} {'req/s':>8}")
    print(f"{'service (HTTP, Serve)':>26} {on:>8.1f}")
    print(f"{'backend called directly':>26} {direct['rps']:>8.1f}")
    print(f"{'direct, full batches of 32':>26} {full['rps']:>8.1f}")
    print(f"{args.backend}: service / direct backend at {top} clients: {on / direct['rps']:.0%} (target >= 80%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--client", metavar="URL", help="run only the load generator against URL")
    p.add_argument("--backend", choices=["bi-encoder", "transformers"], default="bi-encoder")
    p.add_argument("--levels", default="1,8,32", help="concurrent clients per level")
    p.add_argument("--max-requests", type=int, default=200, help="per level")
    p.add_argument("--max-seconds", type=float, default=30.0, help="per level")
    args = p.parse_args()
    if args.client:
        client_main(args.client, [int(x) for x in args.levels.split(",")], args.max_requests,
                    args.max_seconds)
    else:
        server_main(args)


if __name__ == "__main__":
    main()
