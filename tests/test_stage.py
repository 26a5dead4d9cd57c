"""The stage contract: resources resolved for the cluster, and the batch rule (split on out of
memory, fail rows with a reason, never lose one), alone and inside a real Ray Data actor pool."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from larcq_ray.core.stage import Resources, is_out_of_memory, map_stage, resolve, run_batch


@dataclass
class DoublingStage:
    """Doubles x; runs out of memory on batches larger than `fits`; fails on x == poison."""

    fits: int = 2
    poison: int = -1
    name: str = "double"
    actors: int | None = None
    calls: list = field(default_factory=list, repr=False, compare=False)

    def resources(self) -> Resources:
        return Resources(cpus=1, gpus="auto", actors=self.actors)

    def setup(self) -> None:
        self.ready = True

    def process_batch(self, batch):
        assert self.ready
        self.calls.append(len(batch["x"]))
        if len(batch["x"]) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if (batch["x"] == self.poison).any():
            raise ValueError(f"cannot handle {self.poison}")
        return {"id": batch["id"], "y": batch["x"] * 2, "error": np.full(len(batch["x"]), "", dtype=object)}

    def failed_batch(self, batch, reason):
        return {"id": batch["id"], "y": np.full(len(batch["x"]), -1), "error": np.full(len(batch["x"]), reason,
                                                                                       dtype=object)}


def _batch(n):
    return {"id": np.arange(n), "x": np.arange(n) + 10}


def test_out_of_memory_splits_the_batch_until_it_fits():
    stage = DoublingStage(fits=2)
    stage.setup()
    out = run_batch(stage, _batch(7))
    assert list(out["id"]) == list(range(7)) and list(out["y"]) == [2 * (i + 10) for i in range(7)]
    assert set(out["error"]) == {""}
    assert stage.calls[:3] == [7, 3, 1] and sum(c for c in stage.calls if c <= 2) == 7  # halves until they fit


def test_a_row_that_never_fits_or_fails_comes_back_failed_with_its_reason():
    stage = DoublingStage(fits=0)
    stage.setup()
    out = run_batch(stage, _batch(3))
    assert list(out["id"]) == [0, 1, 2] and list(out["y"]) == [-1, -1, -1]
    assert all(e == "double: out of memory on a single row (OutOfMemoryError)" for e in out["error"])

    stage = DoublingStage(fits=8, poison=11)
    stage.setup()
    out = run_batch(stage, _batch(4))  # a plain error fails its batch's rows, with the reason
    assert list(out["id"]) == [0, 1, 2, 3] and set(out["error"]) == {"double: ValueError: cannot handle 11"}


def test_out_of_memory_is_recognized():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("bad input"))


def test_resources_resolve_for_a_cpu_cluster(ray_session):
    cpus = int(ray_session.cluster_resources()["CPU"])
    r = resolve(Resources(gpus="auto", actors=2))
    assert r.gpus == 0.0 and r.torch_threads == max(1, cpus // 2)  # no GPU here: CPU actors share the cores
    assert resolve(Resources(gpus=0.5, actors=1)).torch_threads is None  # a GPU actor keeps Ray's thread count
    assert resolve(Resources(actors=None)).torch_threads is None  # tasks: no pool to share among


@pytest.mark.parametrize("actors", [None, 1])
def test_map_stage_in_ray_data_loses_no_row(ray_session, actors):
    import sys

    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

    ds = ray.data.from_items([{"id": i, "x": i + 10} for i in range(23)], override_num_blocks=3)
    out = map_stage(ds, DoublingStage(fits=2, poison=15, actors=actors), batch_size=5).take_all()
    by_id = {int(r["id"]): r for r in out}
    assert sorted(by_id) == list(range(23))
    failed = {i for i, r in by_id.items() if r["error"]}
    assert 5 in failed and len(failed) <= 2  # x == 15 fails; the split isolates it to at most its pair
    assert all(by_id[i]["y"] == 2 * (i + 10) for i in by_id if i not in failed)
