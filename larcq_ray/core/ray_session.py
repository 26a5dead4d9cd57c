"""Connect to Ray once per process: a cluster when an address is known, else a local Ray.

Order: an already-initialized Ray (tests, notebooks) > --address / ray.address > $RAY_ADDRESS
(set for `ray job submit` drivers) > a new local Ray sized to this machine.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from pydantic import BaseModel, ConfigDict

from larcq_ray.core.errors import LarcqError


class RayConfig(BaseModel):
    """The `ray` section: which cluster the jobs run on."""

    model_config = ConfigDict(extra="forbid")
    # None: $RAY_ADDRESS, or the cluster a submitted job runs in, or a new local Ray.
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # local Ray only; None: all cores


# Console verbosity. Quiet by default: Serve's access and INFO logs, weight-loading progress bars
# and Ray's start-up notices are kept out of the console (warnings and errors still show).
# `larcq-ray --verbose` sets this variable; local Ray workers inherit it and `ensure_ray` hands it
# to the workers of a remote cluster, so every process reads the same switch.
VERBOSE_ENV = "LARCQ_VERBOSE"


def verbose() -> bool:
    """True when this process (driver or Ray worker) should show library and Ray logs in full."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """Set the switch for this process and the Ray workers it starts afterwards."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def quiet_weight_loading() -> None:
    """Turn off transformers' "Loading weights" progress bar in this process unless verbose.

    Called where models are loaded: those run in Ray actors and Serve replicas, whose every bar
    is forwarded to the driver's console.
    """
    if verbose():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _worker_runtime_env() -> Optional[dict]:
    """Job-level runtime_env for ray.init: carries --verbose to the workers of a remote cluster."""
    if not verbose():
        return None
    # A submitted job's own runtime_env is merged with this one; the same env var in both is a
    # conflict ray.init refuses, so leave it to the job when the job sets it already.
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config and VERBOSE_ENV in job_config:
        return None
    return {"env_vars": {VERBOSE_ENV: "1"}}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    loud = verbose()
    if not loud:
        # The notice that a new local Ray enables token authentication (a WARNING, each start).
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    level = logging.INFO if loud else logging.WARNING
    try:
        if address:
            ray.init(address=address, logging_level=level, runtime_env=_worker_runtime_env())
        else:
            ray.init(
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                logging_level=level,
                # Workers' warnings and errors (and, with --verbose, all their output) still reach
                # the console; their INFO noise is kept down at its sources (Serve's logging
                # config, quiet_weight_loading).
                log_to_driver=True,
                runtime_env=_worker_runtime_env(),
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

