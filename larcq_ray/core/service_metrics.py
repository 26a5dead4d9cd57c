"""Service metrics of the /rerank and /search Serve apps, exported through Ray's metrics.

Each metric is a `ray.util.metrics` Counter / Histogram, so it goes where Ray's own metrics go:
every node's metrics agent serves them in the Prometheus text format at
http://<node>:<MetricsExportPort>/metrics (`ray.nodes()[i]["MetricsExportPort"]`), the endpoint
Prometheus already scrapes for Ray. Ray prefixes application metrics with `ray_`, so
`larcq_requests_total` is scraped as `ray_larcq_requests_total`.

  larcq_requests_total{app,route,status}    Counter    requests answered, by HTTP status
  larcq_request_latency_seconds{app,route}  Histogram  request latency inside the replica
  larcq_batch_size{app}                     Histogram  requests scored per backend call
  larcq_backend_latency_seconds{app}        Histogram  one backend call (a batch)
  larcq_errors_total{app,kind}              Counter    failures by kind ("backend", ...)

Histogram buckets are exact; Ray exports a histogram's `_sum` from the buckets (each observation
counted at its bucket's midpoint), so averages from `_sum / _count` are approximate: use the
buckets (`histogram_quantile`).

`app` is the Serve application name (the replica's, when created inside one). One
`ServiceMetrics` per replica; the Ray metric objects themselves are created once per process and
shared. Recording never raises: outside a Ray worker, or when Ray's metrics are unusable, every
call is a no-op.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_SIZE_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256]

_lock = threading.Lock()
_metrics: Optional[dict[str, Any]] = None  # name -> ray.util.metrics object; {} = unusable
_disabled = False  # set after the first failure to record: stay quiet and cheap from then on


def _get() -> dict[str, Any]:
    """The process-wide Ray metric objects, created on first use; {} when they cannot be."""
    global _metrics
    if _metrics is not None:
        return _metrics
    with _lock:
        if _metrics is None:
            try:
                from ray.util.metrics import Counter, Histogram

                _metrics = {
                    "requests": Counter(
                        "larcq_requests_total", description="Requests answered, by HTTP status.",
                        tag_keys=("app", "route", "status")),
                    "request_latency": Histogram(
                        "larcq_request_latency_seconds", description="Request latency in the replica (s).",
                        boundaries=LATENCY_BUCKETS_S, tag_keys=("app", "route")),
                    "batch_size": Histogram(
                        "larcq_batch_size", description="Requests scored per backend call.",
                        boundaries=BATCH_SIZE_BUCKETS, tag_keys=("app",)),
                    "backend_latency": Histogram(
                        "larcq_backend_latency_seconds", description="Latency of one backend call (s).",
                        boundaries=LATENCY_BUCKETS_S, tag_keys=("app",)),
                    "errors": Counter(
                        "larcq_errors_total", description="Failures, by kind.", tag_keys=("app", "kind")),
                }
            except Exception as e:  # noqa: BLE001 - metrics must never break serving
                log.debug("Ray metrics unavailable, service metrics disabled: %s", e)
                _metrics = {}
    return _metrics


def _replica_app_name() -> Optional[str]:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - not inside a Serve replica
        return None


class ServiceMetrics:
    """Records one service's metrics; create one per replica (cheap: no Ray call until recording).

    app: the `app` label; None = the Serve application of the current replica, else `default_app`.
    """

    def __init__(self, app: Optional[str] = None, default_app: str = "larcq") -> None:
        self.app = app or _replica_app_name() or default_app

    def _record(self, name: str, method: str, value: float, tags: dict[str, str]) -> None:
        global _disabled
        if _disabled:
            return
        metric = _get().get(name)
        if metric is None:
            return
        try:
            getattr(metric, method)(value, tags={"app": self.app, **tags})
        except Exception as e:  # noqa: BLE001
            _disabled = True
            log.warning("recording service metrics failed, disabling them: %s", e)

    def record_request(self, route: str, status: int, latency_s: float) -> None:
        """One answered request: route (e.g. "/rerank"), HTTP status, seconds spent in the replica."""
        self._record("requests", "inc", 1, {"route": route, "status": str(int(status))})
        self._record("request_latency", "observe", max(0.0, float(latency_s)), {"route": route})

    def record_batch(self, size: int, latency_s: float) -> None:
        """One backend call that scored `size` requests in `latency_s` seconds."""
        self._record("batch_size", "observe", int(size), {})
        self._record("backend_latency", "observe", max(0.0, float(latency_s)), {})

    def record_error(self, kind: str) -> None:
        """One failure of `kind` ("backend": the backend failed on a request; the routers may add
        their own kinds)."""
        self._record("errors", "inc", 1, {"kind": kind})


def install_request_metrics(app: Any, default_app: str) -> None:
    """Count every request the FastAPI `app` answers (larcq_requests_total and its latency), labelled
    by the route's template ("/audio/{audio_id:path}", not the raw path; "unmatched" for 404s)."""
    import time

    holder: dict[str, ServiceMetrics] = {}

    @app.middleware("http")
    async def _count_requests(request, call_next):
        metrics = holder.get("m")
        if metrics is None:  # first request of this replica: the Serve app name is known now
            metrics = holder["m"] = ServiceMetrics(default_app=default_app)
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            # The app's catch-all handler answers these 500s outside this middleware: count them here.
            metrics.record_request(_route(request), 500, time.perf_counter() - t0)
            raise
        metrics.record_request(_route(request), response.status_code, time.perf_counter() - t0)
        return response


def _route(request: Any) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"
