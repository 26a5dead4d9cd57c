"""Start Ray Serve apps and keep them up: one runner for the /rerank and /search services.

`larcq-ray serve` runs /rerank; `larcq-ray serve --search` runs /search beside it on the same HTTP
proxy (one Serve instance, one host:port, each app under its own route prefix); `larcq-ray
serve-search` runs /search alone. The apps build their Serve applications; this module starts Serve
quietly, deploys them, waits for Ctrl-C or SIGTERM and stops a local Ray it started.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Any

from larcq_ray.core.errors import LarcqError
from larcq_ray.core.ray_session import verbose

log = logging.getLogger(__name__)


@dataclass
class ServeApp:
    name: str  # the Serve application name (serve.delete / get_app_handle)
    build: Any  # () -> ray.serve.Application; called after Serve has started (it may read the cluster)
    route_prefix: str
    what: str  # for messages: "rerank", "search"
    entry: str  # the main path, for the log line: "/rerank"
    start_timeout_s: float = 1800.0  # not RUNNING by then: a LarcqError, not a wait forever


def serve_logging_config():
    """Serve's logging for the controller, proxy and replicas started here.

    Quiet by default: no access log line per request and no INFO lines (deploys, replica starts,
    route updates); warnings and errors still reach the console. `larcq-ray --verbose`
    (LARCQ_VERBOSE=1) keeps Serve's defaults: INFO and access logs.
    """
    from ray.serve.schema import LoggingConfig

    if verbose():
        return LoggingConfig()
    return LoggingConfig(log_level="WARNING", enable_access_log=False)


def start_apps(apps: list[ServeApp], host: str, port: int) -> str:
    """Start Serve on host:port (joining the current Ray session, or a local one) and deploy `apps`;
    returns the base URL. Serve's HTTP options are fixed by whoever started Serve first."""
    import ray
    from ray import serve

    prefixes = [a.route_prefix.rstrip("/") or "/" for a in apps]
    if len(set(prefixes)) < len(prefixes):
        raise LarcqError(f"the {' and '.join(a.what for a in apps)} apps would both answer under {prefixes[0]!r}: "
                         "give them different route prefixes (e.g. --set search.serve.route_prefix=/find)")
    if not ray.is_initialized():
        ray.init(logging_level="ERROR")
    logging_config = serve_logging_config()
    # This process's own Serve logger ("Started Serve", "Application ... is ready", "Deleting
    # app"): Serve sets it up at import, at INFO, not propagating, so it is leveled here.
    logging.getLogger("ray.serve").setLevel(logging_config.log_level)
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    for app in apps:
        try:
            # not serve.run: it waits for RUNNING with no limit, forever when no node can hold a replica
            serve.run_many([serve.RunTarget(app.build(), name=app.name, route_prefix=app.route_prefix,
                                            logging_config=logging_config)], wait_for_applications_running=False)
            wait_running(app)
        except LarcqError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. the model or the index failed to load in the replica
            raise LarcqError(f"the {app.what} service failed to start: {e}") from e
        log.info("%s service at http://%s:%s%s%s", app.what, host, port, app.route_prefix.rstrip("/"), app.entry)
    return f"http://{host}:{port}"


def wait_running(app: ServeApp, poll_s: float = 0.5) -> None:
    """Until `app` is RUNNING. DEPLOY_FAILED (a replica's constructor raised) is a LarcqError with
    Serve's message; so is still deploying after app.start_timeout_s, with what the deployments wait
    for (Serve says after 30 s when a replica's resources are on no node: required and available).
    That wait is also said once as a warning, since an autoscaling cluster may yet add the node."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    t0 = time.monotonic()
    said = False
    while True:
        st = serve.status().applications.get(app.name)
        msgs = [] if st is None else [d.message for d in st.deployments.values() if d.message]
        if st is not None and st.status == ApplicationStatus.RUNNING:
            return
        if st is not None and st.status == ApplicationStatus.DEPLOY_FAILED:
            _delete(app)
            why = "; ".join(_reason(m) for m in msgs) or st.message
            raise LarcqError(f"the {app.what} service failed to start: {why} (the replica logs under Ray's session "
                             "logs have the traceback)")
        waiting = [m for m in msgs if "to be scheduled" in m]
        if waiting and not said:
            log.warning("the %s service is waiting for resources: %s", app.what, waiting[0])
            said = True
        if time.monotonic() - t0 > app.start_timeout_s:
            _delete(app)  # its pending replicas would keep asking for the resources
            why = "; ".join(msgs) or (f"status {st.status}" if st is not None else "no status yet")
            raise LarcqError(
                f"the {app.what} service was not running after {app.start_timeout_s:g} s ({why}). If no node "
                "has the resources a replica asks for, lower its num_cpus / num_gpus or add nodes; if it is "
                "still loading, raise start_timeout_s")
        time.sleep(poll_s)


_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)\w*): (.+)$")


def _reason(message: str) -> str:
    """The root exception of a Serve deployment message (a replica's chained tracebacks): its first
    `SomeError: text` line that is not a wrapped traceback; a LarcqError's text as is."""
    for line in message.splitlines():
        m = _EXC_LINE.match(line.strip())
        if m and not m.group(2).startswith("Traceback"):
            return m.group(2) if m.group(1) == "LarcqError" else f"{m.group(1)}: {m.group(2)}"
    return message.strip().splitlines()[0][:300] if message.strip() else ""


def _delete(app: ServeApp) -> None:
    from ray import serve

    try:
        serve.delete(app.name, _blocking=False)
    except Exception as e:  # noqa: BLE001 - the caller's error matters more
        log.debug("could not delete the %s app: %s", app.what, e)


def wait_until_stopped(apps: list[ServeApp]) -> None:
    """Block until Ctrl-C, then delete `apps`."""
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        for app in apps:
            serve.delete(app.name)


class _Terminated(BaseException):
    """Raised in the main thread by our SIGTERM handler (a BaseException, like KeyboardInterrupt,
    so no `except Exception` on the way swallows it)."""


def _on_sigterm(signum, frame):
    # Once: a second SIGTERM (impatient process managers) must not cut the clean-up short; the
    # SIGKILL that follows a grace period still can.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Terminated


def serve_until_stopped(apps: list[ServeApp], host: str, port: int, ray_address: str | None,
                        ray_num_cpus: int | None) -> None:
    """Run `apps` until Ctrl-C or SIGTERM; stop a local Ray started here.

    SIGTERM (Kubernetes, systemd, docker stop, kill) stops as cleanly as Ctrl-C: the apps are
    deleted, a local Ray is shut down, and the function returns (the CLI exits 0).
    """
    import ray
    from ray import serve

    from larcq_ray.core.ray_session import ensure_ray

    ensure_ray(ray_address, ray_num_cpus)
    # Installed after ray.init, which replaces SIGTERM handling on the driver: ray.init sets a
    # handler that calls sys.exit(15), a local Ray's Node sets one that kills Ray's processes and
    # exits 1, and the core worker adds a native failure-signal handler (the "*** SIGTERM received
    # ***" stack dump) that chains to the previous one. Setting ours afterwards replaces them all.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            start_apps(apps, host, port)
            wait_until_stopped(apps)  # returns after Ctrl-C
        except _Terminated:
            log.info("SIGTERM received: stopping")
            for app in apps:
                try:
                    serve.delete(app.name)
                except Exception as e:  # noqa: BLE001 - e.g. SIGTERM before the app was deployed
                    log.debug("could not delete the %s app: %s", app.what, e)
    finally:
        if not (ray_address or os.environ.get("RAY_ADDRESS")):
            serve.shutdown()  # our own local Ray: stop it here, not in an interruptible atexit hook
            ray.shutdown()
    log.info("%s stopped", " and ".join(f"{a.what} service" for a in apps))
