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
import time
from typing import Any, Union

import pydantic
from ray import serve
from ray.serve import Application
from ray.serve.schema import LoggingConfig

from larcq_ray.core.errors import LarcqError
from larcq_ray.core.ray_session import verbose
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


def serve_logging_config() -> LoggingConfig:
    """Serve's logging for the controller, proxy and replicas that run_server starts.

    Quiet by default: no access log line per request and no INFO lines (deploys, replica starts,
    route updates); warnings and errors still reach the console. `larcq-ray --verbose`
    (LARCQ_VERBOSE=1) keeps Serve's defaults: INFO and access logs.
    """
    if verbose():
        return LoggingConfig()
    return LoggingConfig(log_level="WARNING", enable_access_log=False)


def run_server(cfg: RerankServeConfig, blocking: bool = True, app_name: str = APP_NAME) -> str:
    """Start Serve on cfg.host:cfg.port with the rerank app; returns its base URL.

    blocking=True serves until Ctrl-C. Joins the current Ray session or starts a local one.
    """
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="ERROR")
    logging_config = serve_logging_config()
    # This process's own Serve logger ("Started Serve", "Application ... is ready", "Deleting
    # app"): Serve sets it up at import, at INFO, not propagating, so it is leveled here.
    logging.getLogger("ray.serve").setLevel(logging_config.log_level)
    # Controller and proxy (applies when this call starts Serve), then the app's replicas.
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging_config)
    try:
        serve.run(build_app(cfg), name=app_name, route_prefix=cfg.route_prefix, logging_config=logging_config)
    except LarcqError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. the model failed to load in the replica
        raise LarcqError(f"the rerank service failed to start: {e}") from e
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    log.info("rerank service at %s/rerank", url)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(app_name)
    return url


def serve_until_stopped(cfg) -> None:
    """`larcq-ray serve`: run the /rerank app until Ctrl-C or SIGTERM; stop a Ray we started."""
    import os
    import signal

    import ray

    from larcq_ray.core.ray_session import ensure_ray

    def _stop(signum, frame):  # SIGTERM (container stop, kill) stops as cleanly as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    try:
        run_server(cfg.serve, blocking=True)  # returns after Ctrl-C, app deleted
    finally:
        if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            serve.shutdown()  # our own local Ray: stop it here, not in an interruptible atexit hook
            ray.shutdown()
    log.info("re-rank service stopped")
