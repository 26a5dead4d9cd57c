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
import os
import time
from typing import Any, Literal, Optional, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from larcq_ray.errors import LarcqError
from larcq_ray.rerank.backends import RerankBackendConfig

log = logging.getLogger(__name__)

API_KEY_ENV = "LARCQ_RERANK_API_KEY"
APP_NAME = "larcq-rerank"


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(32.0, gt=0)


class RerankServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: RerankBackendConfig = Field(default_factory=RerankBackendConfig)
    host: str = "127.0.0.1"  # loopback unless asked: the service has no auth by default
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    num_replicas: int = Field(1, ge=1)  # ignored when autoscaling_config is set
    autoscaling_config: Optional[AutoscalingConfig] = None
    num_gpus: Union[float, Literal["auto"]] = 0  # "auto": 1 per replica if the cluster has GPUs
    num_cpus: float = Field(1.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)  # >= max_batch_size, or batches never fill
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_documents: int = Field(100, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1)
    # None: taken from $LARCQ_RERANK_API_KEY where the config is built (driver / Serve controller)
    api_key: Optional[str] = None
    batching: bool = True  # False: every request scored alone (benchmark baseline)

    @pydantic.field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        return v

    @pydantic.field_validator("num_gpus")
    @classmethod
    def _gpus(cls, v: Union[float, str]) -> Union[float, str]:
        if v != "auto" and float(v) < 0:
            raise ValueError("num_gpus must be >= 0 or 'auto'")
        return v

    @pydantic.model_validator(mode="after")
    def _api_key_from_env(self) -> "RerankServeConfig":
        if not self.api_key:
            self.api_key = os.environ.get(API_KEY_ENV) or None  # "" means no auth, not key ""
        return self


def _resolve_num_gpus(value: Union[float, str]) -> float:
    if value != "auto":
        return float(value)
    import ray

    if not ray.is_initialized():
        log.warning("num_gpus: auto with no Ray session yet; assuming no GPU")
        return 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_app(cfg: RerankServeConfig) -> Application:
    """The Serve application for `cfg` (not started)."""
    from larcq_ray.rerank.router import RerankDeployment

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


def run_server(cfg: RerankServeConfig, blocking: bool = True, app_name: str = APP_NAME) -> str:
    """Start Serve on cfg.host:cfg.port with the rerank app; returns its base URL.

    blocking=True serves until Ctrl-C. Joins the current Ray session or starts a local one.
    """
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="ERROR")
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(build_app(cfg), name=app_name, route_prefix=cfg.route_prefix)
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
