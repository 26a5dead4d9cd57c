"""A real Ray head (`ray start --head`) and the real `ray job submit` CLI running `jobs.run` on the
demo inputs (4 synthetic long audios, tiny CLAP, tiny captioner, MiniLM re-ranker), the way
cluster/README.md says to run it, with Ray 2.60's token authentication on.

The head is isolated from the test session's own local Ray (`ray_session`): its own free ports,
its own --temp-dir (so its `ray_current_cluster` file is not the default one that `ray.init()`
reads), its own auth token passed as $RAY_AUTH_TOKEN (~/.ray is not touched), and an env copy for
every subprocess (os.environ is never changed). It runs as `ray start --block` in a new session
and is stopped by signalling that process group, never with `ray stop` (which would kill every
Ray on the machine, the session's included).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
JOB_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _kill_leftovers(marker: str) -> None:
    """Kill any process still running whose command line names our private temp root.

    Ray's job supervisor starts the entrypoint in a new session, so it is not in the head's process
    group; every process of this head (and the job) names the unique temp root in its arguments."""
    import psutil

    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != me and marker in " ".join(p.info["cmdline"] or []):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture
def ray_head():
    # Short path: Ray's unix sockets live under it (108-byte limit), so no pytest tmp_path here.
    root = Path(tempfile.mkdtemp(prefix="larcq_head_", dir="/tmp"))
    dash = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # what `ray get-auth-token --generate` makes
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is the venv's
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM stops at once (no 30 s drain)
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    })
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={root / 'ray'}"],
        env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield {"root": root, "address": f"http://127.0.0.1:{dash}", "env": env, "proc": proc}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group outlived `ray start`
        except ProcessLookupError:
            pass
        _kill_leftovers(str(root))
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _submit(head: dict, cfg: Path) -> str:
    """`ray job submit --no-wait`, retried while the fresh head's job agent is not up yet."""
    deadline = time.monotonic() + 90
    attempt = 0
    while True:
        attempt += 1
        sid = f"larcq_test_{attempt}"
        r = _run([RAY, "job", "submit", "--address", head["address"], "--submission-id", sid,
                  "--working-dir", REPO, "--no-wait", "--",
                  "python", "-m", "jobs.run", "--config", cfg], head["env"])
        if r.returncode == 0:
            return sid
        if head["proc"].poll() is not None:
            pytest.fail("the Ray head exited: " + (head["root"] / "head.log").read_text()[-3000:])
        if time.monotonic() > deadline:
            pytest.fail(f"ray job submit kept failing:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        time.sleep(3)


def _wait(head: dict, sid: str) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        r = _run([RAY, "job", "status", "--address", head["address"], sid], head["env"], timeout=60)
        # `ray job status` prints "Job 'ID' succeeded", "... failed", "... was stopped", else
        # "Status for job 'ID': RUNNING".
        m = re.search(rf"Job '{sid}' (succeeded|failed|was stopped)", r.stdout + r.stderr)
        if m:
            return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[m.group(1)]
        time.sleep(2)
    pytest.fail(f"job {sid} still not finished after {JOB_TIMEOUT_S} s")


def test_ray_job_submit_runs_the_pipeline_on_a_real_head(ray_session, ray_head):
    # ray_session first: the session's local Ray is up while the head runs, and must survive it.
    from larcq_ray.offline.demo import prepare_demo

    # Inputs under the head's private root: their paths in the job's command line let teardown
    # find a stray job driver.
    cfg = prepare_demo(ray_head["root"] / "demo", n_audios=4, seed=0)
    run_dir = ray_head["root"] / "demo" / "run"
    assert not run_dir.exists()  # prepared, not run

    sid = _submit(ray_head, cfg)
    status = _wait(ray_head, sid)
    logs = _run([RAY, "job", "logs", "--address", ray_head["address"], sid], ray_head["env"], timeout=60)
    assert status == "SUCCEEDED", logs.stdout[-4000:] + logs.stderr[-2000:]

    assert sorted(p.name for p in (run_dir / "index").rglob("part-*.parquet"))
    assert (run_dir / "index" / "meta.json").exists()
    for name in ("shortlist.parquet", "captions.parquet", "reranked.parquet", "report.md"):
        assert (run_dir / name).stat().st_size > 0, name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "R@1" in metrics["audio-max+query-sum"] and "R@1" in metrics["final"]
    assert metrics["none"]["n_queries"] == 4
    assert "after re-ranking" in logs.stdout  # the CLI's summary came back through the job logs


def test_session_ray_still_works_after_the_head_is_gone(ray_session):
    """The head's teardown left the test session's own local Ray alone."""
    ray = ray_session

    @ray.remote
    def plus_one(x):
        return x + 1

    assert ray.get(plus_one.remote(41), timeout=60) == 42
