"""Operating the Serve apps: service metrics through Ray's Prometheus export, and SIGTERM.

- The /rerank app (bundled MiniLM, offline) runs in the test session's Ray; after a few requests
  its batch metrics must appear at the node's metrics agent (the endpoint Prometheus scrapes).
- `larcq-ray serve --config X` runs in a subprocess with its own local Ray; SIGTERM must stop it
  with exit code 0 and without Ray's native "*** SIGTERM received ***" dump.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from larcq_ray.rerank.config import API_KEY_ENV, RerankServeConfig
from larcq_ray.core.service_metrics import ServiceMetrics

APP = "ops-rerank"
DOCS = ["rain falls on a tin roof", "a dog is barking loudly", "a car passes by on a wet street"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rerank_url(ray_session):
    from ray import serve

    from larcq_ray.rerank.app import run_server

    saved_key = os.environ.pop(API_KEY_ENV, None)  # this app runs without auth
    port = _free_port()
    try:
        yield run_server(RerankServeConfig(host="127.0.0.1", port=port, num_cpus=0.5, batch_wait_timeout_s=0.05),
                         blocking=False, app_name=APP)
    finally:
        if saved_key is not None:
            os.environ[API_KEY_ENV] = saved_key
        try:
            serve.delete(APP)
        finally:
            serve.shutdown()


def test_a_replica_no_node_can_hold_stops_the_start_with_a_clear_error(rerank_url, ray_session):
    """Serve waits forever for resources no node has (a GPU on this CPU cluster): the start gives up
    after start_timeout_s with an error that says what to change, removes the pending app, and the
    running service is untouched."""
    from ray import serve

    from larcq_ray.core.errors import LarcqError
    from larcq_ray.rerank.app import run_server

    port = int(rerank_url.rsplit(":", 1)[1].split("/")[0])
    cfg = RerankServeConfig(host="127.0.0.1", port=port, num_cpus=0.5, num_gpus=1.0, route_prefix="/nogpu",
                            start_timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(LarcqError, match=r"rerank service was not running after 3 s .*num_gpus"):
        run_server(cfg, blocking=False, app_name="nogpu-rerank")
    assert time.monotonic() - t0 < 60
    deadline = time.monotonic() + 30
    while "nogpu-rerank" in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "nogpu-rerank" not in serve.status().applications
    r = httpx.post(f"{rerank_url}/rerank", json={"query": "rain", "documents": DOCS}, timeout=30)
    assert r.status_code == 200, r.text


def test_a_replica_that_cannot_load_its_model_fails_the_start(rerank_url, ray_session, tmp_path):
    """A replica whose constructor raises (no model in the folder named): Serve gives up on the app,
    and the start says so with Serve's reason instead of a traceback, leaving no app behind."""
    from ray import serve

    from larcq_ray.core.errors import LarcqError
    from larcq_ray.rerank.app import run_server
    from larcq_ray.rerank.config import RerankBackendConfig

    port = int(rerank_url.rsplit(":", 1)[1].split("/")[0])
    cfg = RerankServeConfig(host="127.0.0.1", port=port, num_cpus=0.5, route_prefix="/nomodel", start_timeout_s=120,
                            backend=RerankBackendConfig(kind="bi-encoder", model=str(tmp_path / "no_model_here")))
    with pytest.raises(LarcqError, match="rerank service failed to start: .*no_model_here"):
        run_server(cfg, blocking=False, app_name="nomodel-rerank")
    deadline = time.monotonic() + 30
    while "nomodel-rerank" in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "nomodel-rerank" not in serve.status().applications


def _metrics_url(ray) -> str:
    port = ray._private.worker.global_worker.node.metrics_export_port
    assert port == ray.nodes()[0]["MetricsExportPort"]
    return f"http://127.0.0.1:{port}/metrics"


def _samples(text: str, name: str, app: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of metric `name` (Ray adds the `ray_` prefix) with app=`app`."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"^(?:ray_)?{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)", line)
        if m and f'app="{app}"' in (m.group(1) or ""):
            out.append((m.group(1), float(m.group(2))))
    return out


def _poll(url: str, want: dict[str, str], timeout_s: float = 40.0) -> str:
    """The export text once every metric name in `want` (name -> app) has a sample; fails after timeout_s."""
    def missing(text: str) -> str:
        gone = [n for n, a in want.items() if not _samples(text, n, a)]
        return f"{gone}; larcq lines seen: {[ln for ln in text.splitlines() if 'larcq' in ln][:20]}" if gone else ""

    return _poll_until(url, lambda t: not missing(t), missing, timeout_s)


def test_service_metrics_reach_ray_prometheus_export(rerank_url, ray_session):
    def one(i: int) -> int:
        with httpx.Client(timeout=60) as c:
            return c.post(f"{rerank_url}/rerank", json={"query": f"a dog barks {i}", "documents": DOCS}).status_code

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, range(12))) == [200] * 12
    with httpx.Client(timeout=60) as c:  # a 4xx and an unknown path, counted by the replica's middleware
        assert c.post(f"{rerank_url}/v1/rerank", json={"query": "", "documents": DOCS}).status_code == 422
        assert c.get(f"{rerank_url}/nowhere").status_code == 404

    # record_request / record_error from this driver (a Ray worker too): the same export path the
    # routers' calls take from their replicas.
    driver = ServiceMetrics("ops-driver")
    assert driver.app == "ops-driver"
    driver.record_request("/rerank", 200, 0.05)
    driver.record_request("/rerank", 500, 0.2)
    driver.record_error("backend")

    text = _poll(_metrics_url(ray_session), {
        "larcq_batch_size_count": APP, "larcq_backend_latency_seconds_bucket": APP,
        "larcq_requests_total": "ops-driver", "larcq_request_latency_seconds_count": "ops-driver",
        "larcq_errors_total": "ops-driver",
    })
    # Some backend calls were recorded, never more than the requests (the health probes are not
    # counted: they skip the batch queue). Ray exports `_sum` from bucket midpoints: not checked.
    batches = sum(v for _, v in _samples(text, "larcq_batch_size_count", APP))
    assert 1 <= batches <= 12, batches
    assert any('le="+Inf"' in lbl for lbl, _ in _samples(text, "larcq_backend_latency_seconds_bucket", APP))
    statuses = {re.search(r'status="(\d+)"', lbl).group(1): v
                for lbl, v in _samples(text, "larcq_requests_total", "ops-driver")}
    assert statuses == {"200": 1.0, "500": 1.0}, statuses
    kinds = [lbl for lbl, _ in _samples(text, "larcq_errors_total", "ops-driver")]
    assert any('kind="backend"' in k for k in kinds), kinds
    assert any('route="/rerank"' in lbl for lbl, _ in _samples(text, "larcq_request_latency_seconds_count",
                                                                 "ops-driver"))
    # the replica's own count of what it answered, by route template and status
    text = _poll_until(_metrics_url(ray_session), lambda t: _replica_counts(t).get(("/rerank", "200"), 0) >= 12
                       and ("/v1/rerank", "422") in _replica_counts(t) and ("unmatched", "404") in _replica_counts(t),
                       lambda t: f"replica request counts {_replica_counts(t)}")
    counts = _replica_counts(text)
    assert counts[("/rerank", "200")] >= 12 and counts[("/v1/rerank", "422")] == 1, counts


def _replica_counts(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for lbl, v in _samples(text, "larcq_requests_total", APP):
        route, status = re.search(r'route="([^"]*)"', lbl).group(1), re.search(r'status="(\d+)"', lbl).group(1)
        out[(route, status)] = out.get((route, status), 0) + v
    return out


def _poll_until(url: str, ok, describe, timeout_s: float = 40.0) -> str:
    """The export text once ok(text); fails after timeout_s with describe(text)."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(url, timeout=10).text
        except httpx.HTTPError:
            text = ""
        if ok(text):
            return text
        time.sleep(1.0)
    pytest.fail(f"not exported within {timeout_s}s: {describe(text)}")


def test_service_metrics_are_noops_outside_ray():
    code = ("from larcq_ray.core.service_metrics import ServiceMetrics\n"
            "import ray; assert not ray.is_initialized()\n"
            "m = ServiceMetrics()\n"
            "assert m.app == 'larcq', m.app\n"
            "m.record_request('/rerank', 200, 0.01); m.record_batch(4, 0.02); m.record_error('backend')\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path):
    port = _free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "serve": {"host": "127.0.0.1", "port": port, "backend": {"kind": "bi-encoder", "device": "cpu"}},
        "ray": {"num_cpus": 1},
    }))
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", API_KEY_ENV)}
    env["HF_HUB_OFFLINE"] = "1"
    exe = Path(sys.executable).with_name("larcq-ray")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "larcq_ray.cli"]
    with open(log, "wb") as out:
        # Its own session: the signal goes to this process only, as `kill <pid>` / Kubernetes send it.
        proc = subprocess.Popen(cmd + ["serve", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp_path, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, f"serve exited early ({proc.returncode}):\n{log.read_text()}"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"serve not healthy in 180 s:\n{log.read_text()}"
                time.sleep(1.0)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert rc == 0, f"exit code {rc} after SIGTERM:\n{text}"
    assert "SIGTERM received at" not in text and "*** SIGTERM" not in text, text
    assert "rerank service stopped" in text, text
    assert took < 60
    with pytest.raises(httpx.HTTPError):  # the port is closed: Serve and the local Ray are gone
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_start_wait_says_what_serve_waits_for_and_gives_up(monkeypatch, caplog):
    """wait_running's reading of serve.status() (Serve posts its resource message only after 30 s,
    too slow for the live test above): the message is logged once as a warning, the timeout's error
    carries it, and the app is deleted. A failed deployment's chained traceback gives its root line."""
    import logging
    from types import SimpleNamespace

    from ray import serve
    from ray.serve.schema import ApplicationStatus

    from larcq_ray.core.errors import LarcqError
    from larcq_ray.core.serve_runner import ServeApp, _reason, wait_running

    waiting = ("Deployment 'RerankDeployment' in application 'x' has 1 replicas that have taken more than 30s to be "
               "scheduled. ... Resources required for each replica: {\"CPU\": 1, \"GPU\": 1}, total resources "
               "available: {\"CPU\": 2.0}.")
    status = SimpleNamespace(applications={"x": SimpleNamespace(
        status=ApplicationStatus.DEPLOYING, message="",
        deployments={"RerankDeployment": SimpleNamespace(message=waiting)})})
    deleted = []
    monkeypatch.setattr(serve, "status", lambda: status)
    monkeypatch.setattr(serve, "delete", lambda name, _blocking=True: deleted.append(name))
    app = ServeApp("x", None, "/", "rerank", "/rerank", start_timeout_s=0.3)
    with caplog.at_level(logging.WARNING, logger="larcq_ray.core.serve_runner"):
        with pytest.raises(LarcqError, match=r"not running after 0.3 s .*Resources required for each replica"):
            wait_running(app, poll_s=0.05)
    assert [r.message.count("Resources required") for r in caplog.records] == [1]  # said once, not per poll
    assert deleted == ["x"]

    failed = ("The deployment failed to start 3 times in a row. Error:\n  File \"a.py\", line 1\n"
              "RuntimeError: Traceback (most recent call last):\n  File \"b.py\", line 2\n"
              "FileNotFoundError: Path /m/no_model_here not found\n\nThe above exception ...\nRuntimeError: wrapped")
    assert _reason(failed) == "FileNotFoundError: Path /m/no_model_here not found"
    assert _reason("x\nlarcq_ray.core.errors.LarcqError: the index is gone") == "the index is gone"
    status.applications["x"] = SimpleNamespace(status=ApplicationStatus.DEPLOY_FAILED, message="Failed to update",
                                               deployments={"D": SimpleNamespace(message=failed)})
    with pytest.raises(LarcqError, match=r"rerank service failed to start: FileNotFoundError: Path /m/no_model_here"):
        wait_running(app, poll_s=0.05)
