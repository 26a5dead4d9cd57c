"""Build and run the /search Serve application (`larcq-ray serve-search --config CFG`).

The replica gets the whole PipelineConfig: the index is cfg.run_dir/index, the text tower is
cfg.model, query chunking is cfg.search, and the service's own settings are cfg.search.serve.
Python: `run_server(cfg)`, or `serve.run(build_app(cfg), ...)`.
"""

from __future__ import annotations

import logging
import time

from ray import serve
from ray.serve import Application

from larcq_ray.core.errors import LarcqError
from larcq_ray.rerank.app import serve_logging_config
from larcq_ray.search.router import SearchDeployment
from larcq_ray.search.service_config import APP_NAME

log = logging.getLogger(__name__)


def build_app(cfg) -> Application:
    """The Serve application for `cfg` (a PipelineConfig; not started)."""
    sc = cfg.search.serve
    return SearchDeployment.options(
        num_replicas=sc.num_replicas,
        max_ongoing_requests=sc.max_ongoing_requests,
        ray_actor_options={"num_cpus": sc.num_cpus, "num_gpus": 0},
    ).bind(cfg)


def run_server(cfg, blocking: bool = True, app_name: str = APP_NAME) -> str:
    """Start Serve on search.serve.host:port with the search app; returns its base URL.

    blocking=True serves until Ctrl-C. Joins the current Ray session or starts a local one.
    """
    import ray

    sc = cfg.search.serve
    if not ray.is_initialized():
        ray.init(logging_level="ERROR")
    logging_config = serve_logging_config()
    logging.getLogger("ray.serve").setLevel(logging_config.log_level)
    serve.start(http_options={"host": sc.host, "port": sc.port}, logging_config=logging_config)
    try:
        serve.run(build_app(cfg), name=app_name, route_prefix=sc.route_prefix, logging_config=logging_config)
    except LarcqError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. no index, or the model failed to load in the replica
        raise LarcqError(f"the search service failed to start: {e}") from e
    url = f"http://{sc.host}:{sc.port}{sc.route_prefix.rstrip('/')}"
    log.info("search service at %s/search", url)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(app_name)
    return url


def serve_until_stopped(cfg) -> None:
    """`larcq-ray serve-search`: run the /search app until Ctrl-C or SIGTERM; stop a Ray we started."""
    import os
    import signal

    import ray

    from larcq_ray.core.ray_session import ensure_ray
    from larcq_ray.index.store import IndexStore
    from pathlib import Path

    if not IndexStore(Path(cfg.run_dir) / "index").exists():  # say it here, not as a replica crash
        raise LarcqError(f"no index in {Path(cfg.run_dir) / 'index'}: run `larcq-ray index` first")

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    try:
        run_server(cfg, blocking=True)
    finally:
        if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            serve.shutdown()
            ray.shutdown()
    log.info("search service stopped")
