"""Build and run the /rerank Serve application.

Three ways in:
- Python: `run_server(RerankServeConfig(...))`, or `serve.run(build_app(cfg), ...)`.
- Serve config file / KubeRay RayService: `import_path: larcq_ray.rerank.app:app_builder` with
  `args:` holding RerankServeConfig fields (host / port belong in the file's http_options there).
- CLI: `serve run larcq_ray.rerank.app:app_builder backend.kind=...` is not supported (nested
  keys); pass a config file instead.
"""

from __future__ import annotations

import logging
from typing import Any, Union

import pydantic
from ray.serve import Application

from larcq_ray.core.errors import LarcqError
from larcq_ray.core.serve_runner import ServeApp, start_apps, wait_until_stopped
from larcq_ray.rerank.config import APP_NAME, RerankServeConfig
from larcq_ray.rerank.router import RerankDeployment

log = logging.getLogger(__name__)

def _resolve_num_gpus(value: Union[float, str]) -> float:
    if value != "auto":
        return float(value)
    import ray

    from larcq_ray.core.stage import cluster_gpus

    if not ray.is_initialized():
        log.warning("num_gpus: auto with no Ray session yet; assuming no GPU")
        return 0.0
    return 1.0 if cluster_gpus() > 0 else 0.0  # the same rule as the Ray Data stages' "auto"


def build_app(cfg: RerankServeConfig) -> Application:
    """The Serve application for `cfg` (not started)."""
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": _resolve_num_gpus(cfg.num_gpus)},
    }
    if cfg.autoscaling_config is not None:
        options["autoscaling_config"] = cfg.autoscaling_config.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    return RerankDeployment.options(**options).bind(cfg)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve "application builder": `import_path: larcq_ray.rerank.app:app_builder`, `args: {...}`.

    Takes a plain dict (Serve passes the config file's `args`) and validates it here, so a bad
    key is reported with its name rather than as a Serve import failure.
    """
    try:
        cfg = RerankServeConfig.model_validate(args)
    except pydantic.ValidationError as e:
        raise LarcqError(f"invalid rerank service args: {e}") from e
    return build_app(cfg)


def rerank_app(cfg: RerankServeConfig, app_name: str = APP_NAME) -> ServeApp:
    return ServeApp(app_name, lambda: build_app(cfg), cfg.route_prefix, "rerank", "/rerank", cfg.start_timeout_s)


def run_server(cfg: RerankServeConfig, blocking: bool = True, app_name: str = APP_NAME) -> str:
    """Start Serve on cfg.host:cfg.port with the rerank app; returns its base URL.

    blocking=True serves until Ctrl-C. Joins the current Ray session or starts a local one.
    """
    app = rerank_app(cfg, app_name)
    base = start_apps([app], cfg.host, cfg.port)
    if blocking:
        wait_until_stopped([app])
    return base + cfg.route_prefix.rstrip("/")
