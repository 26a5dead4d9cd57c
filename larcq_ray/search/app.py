"""Build and run the /search Serve application (`larcq-ray serve-search --config CFG`).

The replica gets the whole PipelineConfig: the index is index_root(cfg) (run_dir/index or
index.location, a path or an object-store URI, read in place), the text tower is
cfg.model, query chunking is cfg.search, and the service's own settings are cfg.search.serve.
Python: `run_server(cfg)`, or `serve.run(build_app(cfg), ...)`.
"""

from __future__ import annotations

import logging

from ray.serve import Application

from larcq_ray.core.errors import LarcqError
from larcq_ray.core.serve_runner import ServeApp, start_apps, wait_until_stopped
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


def search_app(cfg, app_name: str = APP_NAME) -> ServeApp:
    return ServeApp(app_name, lambda: build_app(cfg), cfg.search.serve.route_prefix, "search", "/",
                    cfg.search.serve.start_timeout_s)


def check_index(cfg) -> None:
    """Say a missing index here, not as a replica that fails to start. The index may be anywhere the
    replicas and shard actors can read (a path they all see, or an object-store URI): they read it in
    place."""
    from larcq_ray.index.store import IndexStore, index_root

    if not IndexStore(index_root(cfg)).exists():
        raise LarcqError(f"no index in {index_root(cfg)}: run `larcq-ray index` first")


def run_server(cfg, blocking: bool = True, app_name: str = APP_NAME) -> str:
    """Start Serve on search.serve.host:port with the search app; returns its base URL.

    blocking=True serves until Ctrl-C. Joins the current Ray session or starts a local one.
    """
    sc = cfg.search.serve
    app = search_app(cfg, app_name)
    base = start_apps([app], sc.host, sc.port)
    if blocking:
        wait_until_stopped([app])
    return base + sc.route_prefix.rstrip("/")
