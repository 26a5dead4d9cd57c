"""cluster/: the launcher config and KubeRay manifests parse, have the fields their tools need, and
everything they name (job entrypoints, config files, import paths, Serve args) exists in this repo."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
# Every text file of cluster/ plus the main README, where commands are documented.
TEXTS = sorted([p for p in CLUSTER.rglob("*") if p.is_file()] + [REPO / "README.md"])
KINDS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}


def load(path: Path):
    return yaml.safe_load(path.read_text())


def _all_text() -> str:
    return "\n".join(p.read_text() for p in TEXTS)


def _cluster_specs(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[doc["kind"]]


def _serve_config() -> dict:
    doc = load(KUBERAY / "rayservice.yaml")
    raw = doc["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 must be a YAML string (block scalar)"
    return yaml.safe_load(raw)


def test_the_expected_files_exist():
    for rel in ("ray-cluster.yaml", "Dockerfile", "README.md", "kuberay/raycluster.yaml",
                "kuberay/rayjob.yaml", "kuberay/rayservice.yaml"):
        assert (CLUSTER / rel).is_file(), rel


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path):
    assert isinstance(load(path), dict)


def test_cluster_launcher_config():
    cfg = load(CLUSTER / "ray-cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands", "docker", "setup_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert cfg["docker"]["image"].startswith("rayproject/ray")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # no task lands on the head
    assert "InstanceType" in head["node_config"]
    gpu_workers = [t for name, t in types.items()
                   if name != cfg["head_node_type"] and t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_workers, "no GPU worker node type"
    for t in gpu_workers:
        assert t["max_workers"] > t.get("min_workers", 0) >= 0
        assert t["max_workers"] <= cfg.get("max_workers", t["max_workers"])
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_cmds and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmds
    assert "--dashboard-host=0.0.0.0" in head_cmds
    assert "$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    assert any("pip install" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kuberay_manifest(name):
    doc = load(KUBERAY / name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == KINDS[name]
    assert doc["metadata"]["name"]
    spec = _cluster_specs(doc)
    assert spec, f"{name} has no cluster spec"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # a string: rayStartParams values are strings
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert spec.get("enableInTreeAutoscaling") is True
    groups = spec["workerGroupSpecs"]
    assert groups
    gpu_groups = []
    for g in groups:
        assert g["groupName"] and 0 <= g["minReplicas"] <= g["maxReplicas"]
        assert g["maxReplicas"] >= 1
        for c in g["template"]["spec"]["containers"]:
            if int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1:
                gpu_groups.append(g)
    assert gpu_groups, f"{name}: no worker group with an nvidia.com/gpu limit"
    # Every Ray container gets the same token-auth settings.
    containers = head["template"]["spec"]["containers"] + [
        c for g in groups for c in g["template"]["spec"]["containers"]]
    for c in containers:
        assert c["image"]
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_rayjob_runs_the_benchmark_and_cleans_up():
    spec = load(KUBERAY / "rayjob.yaml")["spec"]
    assert spec["entrypoint"].split()[:3] == ["python", "-m", "jobs.benchmark"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)


def test_rayservice_serve_config():
    serve_cfg = _serve_config()
    assert serve_cfg["http_options"]["host"] == "0.0.0.0"
    assert serve_cfg["http_options"]["port"] == 8000
    (app,) = serve_cfg["applications"]
    assert app["name"] == "larcq-rerank" and app["route_prefix"] == "/"
    assert app["import_path"] == "larcq_ray.rerank.app:app_builder"


def test_rayservice_args_are_valid_rerank_serve_config(monkeypatch):
    from larcq_ray.rerank.app import API_KEY_ENV, RerankServeConfig

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    (app,) = _serve_config()["applications"]
    cfg = RerankServeConfig.model_validate(app["args"])
    assert cfg.api_key is None  # the key comes from the pod env, never from the manifest
    assert float(cfg.num_gpus) >= 1 and cfg.backend.device == "cuda"
    assert cfg.max_ongoing_requests >= cfg.max_batch_size
    # The API key reaches every container that may build the app, from a Secret.
    spec = load(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"]
    containers = spec["headGroupSpec"]["template"]["spec"]["containers"] + [
        c for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        assert "secretKeyRef" in env[API_KEY_ENV]["valueFrom"], c["name"]


def _named(pattern: str) -> list[str]:
    return sorted(set(re.findall(pattern, _all_text())))


JOB_MODULES = _named(r"python -m jobs\.(\w+)")
CONFIG_PATHS = _named(r"--config[ =]((?:configs|cluster)/[\w./-]+\.ya?ml)")
IMPORT_PATHS = _named(r"\b(larcq_ray(?:\.\w+)+:\w+)")


def test_the_regexes_found_something():
    assert "run" in JOB_MODULES and "benchmark" in JOB_MODULES
    assert "configs/benchmark_clotho.yaml" in CONFIG_PATHS
    assert "larcq_ray.rerank.app:app_builder" in IMPORT_PATHS


@pytest.mark.parametrize("module", JOB_MODULES)
def test_named_job_entrypoint_exists(module):
    assert (REPO / "jobs" / f"{module}.py").is_file(), f"python -m jobs.{module} is documented but missing"


@pytest.mark.parametrize("path", CONFIG_PATHS)
def test_named_config_exists(path):
    assert (REPO / path).is_file(), f"--config {path} is documented but missing"
    assert isinstance(load(REPO / path), dict)


@pytest.mark.parametrize("import_path", IMPORT_PATHS)
def test_named_import_path_resolves(import_path):
    module, attr = import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_dockerfile_installs_the_repo():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.\d+-py3\d+-gpu", text, re.M)
    assert "pip install" in text and re.search(r"-e \.", text)
    assert re.search(r"^WORKDIR ", text, re.M)
