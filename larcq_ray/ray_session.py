"""Connect to Ray once per process: a cluster when an address is known, else a local Ray.

Order: an already-initialized Ray (tests, notebooks) > --address / ray.address > $RAY_ADDRESS
(set for `ray job submit` drivers) > a new local Ray sized to this machine.
"""

from __future__ import annotations

import logging
import os

from larcq_ray.errors import LarcqError


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
    except ConnectionError as e:
        raise LarcqError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    _quiet_ray_data()


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Our own per-file progress bar is what users read; Ray's per-operator bars flood job logs.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray._private.authentication"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
