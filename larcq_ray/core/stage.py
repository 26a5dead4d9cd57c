"""The stage contract: what every Ray Data stage of larcq_ray is, and the one way it is run.

A stage (in the spirit of NeMo Curator's ProcessingStage) is a small object built from config on
the driver and shipped to workers. It:
- declares what it needs: `resources()` -> `Resources` (CPUs, GPUs, memory, actor pool size);
- loads what it needs once per worker: `setup()` (a model, a featurizer);
- processes a batch of columns: `process_batch(batch) -> batch`;
- says how rows look when they could not be processed: `failed_batch(batch, reason) -> batch`,
  the same rows marked failed with the reason, so no row is ever lost.

`map_stage(ds, stage, batch_size)` turns that into `Dataset.map_batches` arguments: an actor
pool (`ActorPoolStrategy`) when the stage asks for actors, plain tasks otherwise; `gpus="auto"`
means one GPU per actor where the cluster has GPUs. `run_batch` is the one rule for a batch that
fails: out of GPU (or host) memory -> split it in half and retry each half, down to single rows;
any other error, or a single row that still does not fit -> its rows come back failed with the reason.

Stages are plain classes (no base class to inherit from); `Stage` is the protocol they satisfy.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, Union

import numpy as np

from larcq_ray.core.devices import free_accelerator_memory, is_out_of_memory  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: Union[float, Literal["auto"]] = 0.0  # per task / actor; "auto": 1 where the cluster has GPUs
    memory_mb: int | None = None  # reserved per task / actor, so the scheduler packs by memory too
    actors: int | None = None  # None: stateless Ray tasks; n: a pool of n actors (the model loads once each)
    tasks: int | None = None  # task stages: at most this many at once (None: as many as the cluster fits)
    torch_threads: int | None = None  # CPU actors; None: the cluster's CPUs shared among the actors


class Stage(Protocol):
    name: str

    def resources(self) -> Resources: ...

    def setup(self) -> None: ...

    def process_batch(self, batch: Batch) -> Batch: ...

    def failed_batch(self, batch: Batch, reason: str) -> Batch: ...


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))


def resolve(res: Resources) -> Resources:
    """Concrete numbers for this cluster: "auto" GPUs decided, CPU actors' torch threads set."""
    gpus = res.gpus
    if gpus == "auto":
        gpus = 1.0 if res.actors and cluster_gpus() > 0 else 0.0
    threads = res.torch_threads
    if threads is None and res.actors and not gpus:
        # Ray sets OMP_NUM_THREADS=num_cpus (usually 1) in workers; a CPU model wants the cores.
        threads = max(1, cluster_cpus() // res.actors)
    return replace(res, gpus=float(gpus), torch_threads=threads)


# -- the batch rule ------------------------------------------------------------------------


def batch_len(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def slice_batch(batch: Batch, lo: int, hi: int) -> Batch:
    return {k: v[lo:hi] for k, v in batch.items()}


def concat_batches(parts: list[Batch]) -> Batch:
    parts = [p for p in parts if p and batch_len(p)]
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def run_batch(stage: Stage, batch: Batch) -> Batch:
    """`stage.process_batch` under the rule: split on out-of-memory, fail rows (never lose them)."""
    try:
        return stage.process_batch(batch)
    except Exception as e:  # noqa: BLE001 - one batch must never end the job
        oom = is_out_of_memory(e)
        first = str(e).strip().splitlines()[0][:240] if str(e).strip() else ""
        what = type(e).__name__
    # Out of the except block, so the exception's traceback (frames holding the failed batch's GPU
    # tensors) is gone before the cache is emptied and the halves are retried.
    n = batch_len(batch)
    if oom:
        free_accelerator_memory()
        if n > 1:
            half = n // 2
            log.debug("%s: out of memory on a batch of %d rows; retrying as %d + %d", stage.name, n, half, n - half)
            return concat_batches([run_batch(stage, slice_batch(batch, 0, half)),
                                   run_batch(stage, slice_batch(batch, half, n))])
        return stage.failed_batch(batch, f"{stage.name}: out of memory on a single row ({what})")
    return stage.failed_batch(batch, f"{stage.name}: {what}: {first}")


# -- Ray Data adapters --------------------------------------------------------------------


class _ActorRunner:
    """One actor of a stage's pool: setup once, then every batch through `run_batch`."""

    def __init__(self, stage: Stage, torch_threads: int | None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.stage = stage
        stage.setup()

    def __call__(self, batch: Batch) -> Batch:
        return run_batch(self.stage, batch)


_task_stages: dict[str, Any] = {}  # per worker process: one set-up copy of each task stage


def run_in_task(batch: Batch, stage: Stage) -> Batch:
    """One batch through `stage` in a Ray task (Ray Data's task pools, or plain tasks as synthesis
    renders): the stage is set up once per worker process and kept for the next batches."""
    key = f"{type(stage).__qualname__}:{stage!r}"  # stages are dataclasses: repr is their settings
    ready = _task_stages.get(key)
    if ready is None:
        stage.setup()
        ready = _task_stages[key] = stage
    return run_batch(ready, batch)


def map_stage(ds, stage: Stage, batch_size: int | None):
    """`ds.map_batches(...)` for `stage`, with its declared resources resolved for this cluster."""
    import ray

    res = resolve(stage.resources())
    common: dict[str, Any] = dict(batch_size=batch_size, batch_format="numpy", num_cpus=res.cpus)
    if res.memory_mb:
        common["memory"] = res.memory_mb * 2**20
    if res.actors:
        # A class named after the stage, so Ray's operator names and errors say which stage it is.
        runner = type(stage.name, (_ActorRunner,), {})
        return ds.map_batches(runner, compute=ray.data.ActorPoolStrategy(size=res.actors), num_gpus=res.gpus,
                              fn_constructor_kwargs=dict(stage=stage, torch_threads=res.torch_threads), **common)
    if res.tasks:
        common["compute"] = ray.data.TaskPoolStrategy(size=res.tasks)
    return ds.map_batches(run_in_task, fn_kwargs=dict(stage=stage), num_gpus=res.gpus or None, **common)
