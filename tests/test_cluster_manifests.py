"""cluster/: what the tools would do with these files, checked offline with the tools' own checks.

- ray-cluster.yaml goes through the checks `ray up` runs before it launches anything (Ray's
  prepare_config + validate_config), and its `ray start` lines parse as Ray's own CLI parses them.
- Every pod template of the KubeRay manifests (head, worker groups, the RayJob's submitter) is a
  valid Kubernetes PodTemplateSpec by Kubernetes' own OpenAPI schemas (kubernetes-validate, strict);
  KubeRay's CRD schemas are not available offline, so the fields KubeRay itself reads are checked
  by what they do: rayStartParams parse as `ray start` flags, the RayJob's entrypoint parses as a
  `larcq-ray` command whose config validates, the RayService's serveConfigV2 validates as a Serve
  config and its import_path + args build the Serve application.
- The Dockerfile is replayed (WORKDIR / COPY) over this checkout without a Docker engine: every
  COPY source exists and the image holds what the manifests run.
- Everything the docs name (job entrypoints, config files, import paths) exists and works.
Each check that could pass vacuously has a negative twin that shows it catches a broken copy.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
MANIFESTS = ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml")
# Kubernetes schema version the pod templates are validated against (kubernetes-validate ships it).
K8S_VERSION = "1.33"
# Every text file of cluster/ plus the main README, where commands are documented.
TEXTS = sorted([p for p in CLUSTER.rglob("*") if p.is_file()] + [REPO / "README.md"])


def load(path: Path):
    return yaml.safe_load(path.read_text())


# --- helpers: Ray's own parsers -------------------------------------------------------------------

def ray_start_params(argv: list[str]) -> dict:
    """`ray start ARGV` parsed by Ray's own click command (raises on an unknown or malformed flag)."""
    from ray.scripts.scripts import start

    return start.make_context("ray start", list(argv)).params


def ray_start_in(commands: list[str]) -> dict:
    """The parameters of the one `ray start` among shell command lines like `ulimit ...; ray start ...`."""
    found = [shlex.split(part) for cmd in commands for part in re.split(r";|&&", cmd)]
    found = [argv[2:] for argv in found if argv[:2] == ["ray", "start"]]
    assert len(found) == 1, f"expected one `ray start` in {commands}"
    return ray_start_params(found[0])


def ray_up_checks(cfg: dict) -> dict:
    """What `ray up` does to a config before it launches anything: fill defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


# --- ray-cluster.yaml (`ray up`) -----------------------------------------------------------------

LAUNCHER = load(CLUSTER / "ray-cluster.yaml")


@pytest.fixture(scope="module")
def launcher() -> dict:
    return ray_up_checks(LAUNCHER)


def test_ray_up_accepts_the_launcher_config(launcher):
    assert launcher["head_node_type"] in launcher["available_node_types"]


def _set(path: str, value):
    def mutate(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _worker_type(cfg: dict) -> dict:
    return next(t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"])


def _rename(section: str | None, old: str, new: str):
    def mutate(cfg):
        node = cfg[section] if section else cfg
        node[new] = node.pop(old)
    return mutate


@pytest.mark.parametrize("mutate,match", [
    (_set("head_node_type", "no_such_type"), "head_node_type"),
    (_rename(None, "worker_start_ray_commands", "worker_start_commands"), "worker_start_commands"),
    (_rename("docker", "pull_before_run", "pull_before_rn"), "pull_before_rn"),
    (lambda cfg: _worker_type(cfg).update(resources="GPU: 1"), "not of type 'object'"),
    (lambda cfg: _worker_type(cfg).pop("node_config"), "node_config"),
    (_set("max_workers", -1), "minimum"),
], ids=["bad-head-type", "misspelt-key", "misspelt-docker-key", "resources-not-a-map", "no-node-config",
        "negative-max-workers"])
def test_ray_up_rejects_a_broken_copy(mutate, match):
    import jsonschema

    broken = copy.deepcopy(LAUNCHER)
    mutate(broken)
    with pytest.raises((ValueError, jsonschema.ValidationError), match=match):
        ray_up_checks(broken)


def test_the_head_takes_no_tasks(launcher):
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # what `ray up` advertises for the head: no CPU, no task
    assert not head["resources"].get("GPU")


def test_a_gpu_worker_type_autoscales(launcher):
    types = launcher["available_node_types"]
    gpu = {name: t for name, t in types.items()
           if name != launcher["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no GPU worker node type"
    # prepare_config filled each type's max_workers (bounded by the global one)
    assert any(t["max_workers"] > t.get("min_workers", 0) for t in gpu.values()), "GPU workers cannot scale up"
    assert launcher["max_workers"] > sum(t.get("min_workers", 0) for t in types.values())


def test_start_commands_run_an_autoscaling_head_that_the_workers_join(launcher):
    head = ray_start_in(launcher["head_start_ray_commands"])
    worker = ray_start_in(launcher["worker_start_ray_commands"])
    assert head["head"] and head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"  # the file ray up writes
    assert head["dashboard_host"] == "0.0.0.0"  # `ray job submit` from outside the head node
    assert not worker["head"]
    port = head["port"] or 6379
    assert worker["address"] == f"$RAY_HEAD_IP:{port}", "workers must join the head's GCS port"


def test_ray_start_parsing_catches_a_bad_flag():
    import click

    with pytest.raises(click.UsageError):
        ray_start_in(["ray start --head --dashbord-host=0.0.0.0"])
    with pytest.raises(click.BadParameter):
        ray_start_params(["--num-cpus=zero"])


# --- KubeRay manifests ----------------------------------------------------------------------------

def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[doc["kind"]]


def pod_templates(name: str) -> list[tuple[str, dict]]:
    """(role, PodTemplateSpec) for every pod KubeRay creates from the manifest."""
    doc = load(KUBERAY / name)
    spec = cluster_spec(doc)
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(f"worker/{g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        out.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return out


TEMPLATES = [(f"{name}:{role}", t) for name in MANIFESTS for role, t in pod_templates(name)]


def k8s_validate(template: dict) -> None:
    """Validate a PodTemplateSpec as the `template` of a v1 PodTemplate, by Kubernetes' schemas."""
    import kubernetes_validate

    resource = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def quantity(value) -> float:
    """A Kubernetes CPU / GPU quantity: 4, "4", "500m"."""
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def test_every_manifest_has_head_and_worker_templates():
    roles = {name: [role for role, _ in pod_templates(name)] for name in MANIFESTS}
    for name, rs in roles.items():
        assert "head" in rs and any(r.startswith("worker/") for r in rs), (name, rs)
    assert "submitter" in roles["rayjob.yaml"]


@pytest.mark.parametrize("template", [t for _, t in TEMPLATES], ids=[i for i, _ in TEMPLATES])
def test_pod_template_is_valid_kubernetes(template):
    k8s_validate(template)
    # An API-server rule the schema cannot express: a mount names a volume of its own pod.
    volumes = {v["name"] for v in template["spec"].get("volumes", [])}
    for c in containers(template):
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']} mounts undeclared volume {m['name']!r}"


def _head_template():
    return copy.deepcopy(pod_templates("raycluster.yaml")[0][1])


def _mutate_container(fn):
    def mutate(t):
        fn(containers(t)[0])
    return mutate


@pytest.mark.parametrize("mutate,path", [
    (_mutate_container(lambda c: c["resources"].update(limits=[{"cpu": "4"}])), "resources.limits"),
    (_mutate_container(lambda c: c["env"].append({"value": "x"})), "env"),
    (_mutate_container(lambda c: c.update(volumeMount=c.pop("volumeMounts"))), "containers.0"),
    (_mutate_container(lambda c: c["ports"][0].update(containerPort="gcs")), "containerPort"),
    (lambda t: t["spec"].update(containers={"name": "ray-head"}), "spec.containers"),
], ids=["limits-as-list", "env-without-name", "misspelt-field", "port-not-a-number", "containers-not-a-list"])
def test_kubernetes_validation_catches_a_broken_template(mutate, path):
    import kubernetes_validate

    broken = _head_template()
    mutate(broken)
    with pytest.raises(kubernetes_validate.ValidationError) as err:
        k8s_validate(broken)
    assert path in ".".join(str(p) for p in err.value.path)


@pytest.mark.parametrize("name", MANIFESTS)
def test_ray_start_params_are_ray_start_flags(name):
    """KubeRay runs `ray start [--head] --KEY=VALUE ...` from rayStartParams (a map of strings)."""
    spec = cluster_spec(load(KUBERAY / name))
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for group, g in groups:
        params = g.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{group}: rayStartParams values must be strings"
        argv = (["--head"] if group == "head" else ["--address=head:6379"]) + [f"--{k}={v}" for k, v in params.items()]
        parsed = ray_start_params(argv)
        if group == "head":
            assert parsed["num_cpus"] == 0, "the head takes no tasks: drivers, GCS, dashboard only"


@pytest.mark.parametrize("name", MANIFESTS)
def test_a_gpu_worker_group_autoscales(name):
    spec = cluster_spec(load(KUBERAY / name))
    assert spec.get("enableInTreeAutoscaling") is True
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(quantity(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
                         for c in containers(g["template"]))]
    assert gpu_groups, f"{name}: no worker group with an nvidia.com/gpu limit"
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
    assert any(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), f"{name}: GPU groups cannot scale up"


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_pod_gets_the_same_ray_token_from_a_secret(name):
    refs = set()
    for role, t in pod_templates(name):
        for c in containers(t):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{role}/{c['name']}: no token auth"
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            refs.add((ref["name"], ref["key"]))
    assert len(refs) == 1, f"{name}: pods read the token from different secrets {refs}"


# RayJob

def test_rayjob_entrypoint_is_a_cli_command_with_a_valid_config():
    from larcq_ray.cli import build_parser
    from larcq_ray.config import load_config

    spec = load(KUBERAY / "rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), argv
    assert importlib.util.find_spec(argv[2]) is not None, f"no module {argv[2]}"
    args = build_parser().parse_args([argv[2].removeprefix("jobs.").replace("_", "-"), *argv[3:]])
    load_config(REPO / args.config, args.set)
    # It runs in the image's WORKDIR: the module and the config must be in the image there.
    image = replay_dockerfile()
    for rel in (f"{argv[2].replace('.', '/')}.py", args.config):
        assert image.has(rel), f"{rel} is not in the image's WORKDIR {image.workdir}"
    # A throw-away cluster: deleted once the job ends.
    assert spec["shutdownAfterJobFinishes"] is True


# RayService

def serve_config() -> dict:
    raw = load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"]
    assert isinstance(raw, str), "serveConfigV2 is a string (a YAML block scalar), not a mapping"
    return yaml.safe_load(raw)


def serve_schema(raw: dict):
    """Serve's own schema for a config file / serveConfigV2 (`serve deploy` validates with it)."""
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(raw)


def build_serve_app(app_schema):
    """What the Serve controller does with an application entry: import, then call the builder."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    return call_user_app_builder_with_args_if_necessary(import_attr(app_schema.import_path), app_schema.args)


def test_serve_config_validates_as_a_serve_config():
    schema = serve_schema(serve_config())
    assert [a.import_path for a in schema.applications]


@pytest.mark.parametrize("mutate,match", [
    (lambda raw: raw["applications"][0].pop("import_path"), "import_path"),
    (lambda raw: raw["applications"][0].update(import_path="larcq_ray"), "import path"),
    (lambda raw: raw["applications"][0].update(args=["backend.kind=cross-encoder"]), "args"),
    (lambda raw: raw["http_options"].update(port="http"), "port"),
], ids=["no-import-path", "import-path-without-attr", "args-not-a-map", "port-not-a-number"])
def test_serve_schema_catches_a_broken_copy(mutate, match):
    import pydantic

    raw = serve_config()
    mutate(raw)
    with pytest.raises(pydantic.ValidationError, match=match):
        serve_schema(raw)


def _gpu_worker_pods() -> list[tuple[dict, dict]]:
    """(worker group, resource limits of its container) for the RayService's GPU groups."""
    spec = cluster_spec(load(KUBERAY / "rayservice.yaml"))
    out = []
    for g in spec["workerGroupSpecs"]:
        for c in containers(g["template"]):
            limits = c.get("resources", {}).get("limits", {})
            if quantity(limits.get("nvidia.com/gpu", 0)) >= 1:
                out.append((g, limits))
    return out


def test_serve_config_builds_the_rerank_app_that_fits_the_gpu_workers(monkeypatch):
    from ray.serve import Application

    from larcq_ray.rerank.config import API_KEY_ENV, RerankServeConfig

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    (app_schema,) = serve_schema(serve_config()).applications
    app = build_serve_app(app_schema)
    assert isinstance(app, Application)
    deployment = app._bound_deployment  # what Serve deploys: options + the validated config
    (cfg,) = deployment.init_args
    assert isinstance(cfg, RerankServeConfig)
    assert cfg.api_key is None  # the key comes from the pod env, never from the manifest
    actor = deployment.ray_actor_options
    assert actor["num_gpus"] >= 1, "a replica per GPU"
    assert deployment.max_ongoing_requests >= cfg.max_batch_size, "batches could never fill"
    # A replica fits on one GPU worker pod, and the largest number of replicas fits the GPU groups.
    pods = _gpu_worker_pods()
    assert any(actor["num_gpus"] <= quantity(lim["nvidia.com/gpu"]) and actor["num_cpus"] <= quantity(lim["cpu"])
               for _, lim in pods), "no GPU worker pod can host a replica"
    max_replicas = deployment._deployment_config.autoscaling_config.max_replicas
    gpus = sum(g["maxReplicas"] * quantity(lim["nvidia.com/gpu"]) for g, lim in pods)
    assert max_replicas * actor["num_gpus"] <= gpus, "autoscaling asks for more GPUs than the groups can add"


def test_every_container_that_may_build_the_app_gets_the_api_key_from_a_secret(monkeypatch):
    from larcq_ray.rerank.config import API_KEY_ENV

    for role, t in pod_templates("rayservice.yaml"):
        for c in containers(t):
            env = {e["name"]: e for e in c.get("env", [])}
            assert "secretKeyRef" in env.get(API_KEY_ENV, {}).get("valueFrom", {}), f"{role}/{c['name']}"
    # ... and an app built where that variable is set uses it.
    monkeypatch.setenv(API_KEY_ENV, "from-the-secret")
    (app_schema,) = serve_schema(serve_config()).applications
    (cfg,) = build_serve_app(app_schema)._bound_deployment.init_args
    assert cfg.api_key == "from-the-secret"


def test_serve_listens_on_the_port_the_pods_expose():
    http = serve_schema(serve_config()).http_options
    assert http.host == "0.0.0.0", "Serve on loopback is unreachable from the Kubernetes Service"
    ports = [p["containerPort"] for _, t in pod_templates("rayservice.yaml") for c in containers(t)
             for p in c.get("ports", []) if p.get("name") == "serve"]
    assert ports and set(ports) == {http.port}, f"Serve listens on {http.port}, the pods expose {ports}"


# --- Dockerfile (replayed without a Docker engine) ------------------------------------------------

class Image:
    """The files the image would hold under each path, from replaying WORKDIR and COPY."""

    def __init__(self):
        self.workdir = PurePosixPath("/")
        self.files: set[PurePosixPath] = set()
        self.missing: list[str] = []  # COPY sources absent from the build context
        self.installs: list[tuple[PurePosixPath, set[PurePosixPath]]] = []  # (dir, files then) per `pip install -e .`

    def has(self, rel: str) -> bool:
        return self.workdir / rel in self.files


def _instructions(text: str) -> list[tuple[str, str]]:
    lines, buf = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue  # comments, also inside a continued instruction
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
        buf = ""
    return lines


def _context_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    return [p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]


def replay_dockerfile(text: str | None = None, context: Path = REPO) -> Image:
    """`docker build -f cluster/Dockerfile .` from the repo root, as far as files go."""
    image = Image()
    for word, rest in _instructions(text if text is not None else (CLUSTER / "Dockerfile").read_text()):
        if word == "WORKDIR":
            image.workdir = image.workdir / rest
        elif word == "COPY":
            *srcs, dest = [a for a in shlex.split(rest) if not a.startswith("--")]
            to = image.workdir / dest
            into_dir = dest.endswith("/") or len(srcs) > 1
            for s in srcs:
                src = context / s
                if not src.exists():
                    image.missing.append(s)
                    continue
                for f in _context_files(src):
                    if src.is_dir():
                        image.files.add(to / f.relative_to(src).as_posix())
                    else:
                        image.files.add(to / f.name if into_dir else to)
        elif word == "RUN" and re.search(r"pip install .*-e \.", rest):
            image.installs.append((image.workdir, set(image.files)))
    return image


def test_every_dockerfile_copy_source_exists():
    assert replay_dockerfile().missing == [], "COPY sources missing from the build context (the repo root)"
    broken = replay_dockerfile("WORKDIR /app\nCOPY pyproject.toml no_such_dir ./\n")
    assert broken.missing == ["no_such_dir"] and broken.has("pyproject.toml")


def test_the_image_can_install_and_run_the_project():
    image = replay_dockerfile()
    assert image.installs, "the image never installs the project"
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("readme")
    for where, files in image.installs:
        # setuptools needs pyproject.toml and the readme it names at `pip install -e .` time
        assert where / "pyproject.toml" in files and (readme is None or where / readme in files), where
    for pkg in ("larcq_ray", "jobs"):
        assert image.has(f"{pkg}/__init__.py"), pkg


def test_one_ray_version_everywhere():
    """KubeRay's rayVersion, the launcher's image and the Dockerfile's base image name the same Ray."""
    versions = {"ray-cluster.yaml": LAUNCHER["docker"]["image"],
                "Dockerfile": next(rest for word, rest in _instructions((CLUSTER / "Dockerfile").read_text())
                                   if word == "FROM")}
    versions = {k: re.search(r"rayproject/ray:(\d+\.\d+\.\d+)", v).group(1) for k, v in versions.items()}
    versions.update({name: cluster_spec(load(KUBERAY / name))["rayVersion"] for name in MANIFESTS})
    assert len(set(versions.values())) == 1, versions


# --- what the docs and manifests name -------------------------------------------------------------

def _all_text() -> str:
    return "\n".join(p.read_text() for p in TEXTS)


def _named(pattern: str) -> list:
    return sorted(set(re.findall(pattern, _all_text())))


JOB_MODULES = _named(r"python -m jobs\.(\w+)")
CONFIG_PATHS = _named(r"--config[ =]((?:configs|cluster)/[\w./-]+\.ya?ml)")
IMPORT_PATHS = _named(r"\b(larcq_ray(?:\.\w+)+:\w+)")
# `larcq-ray CMD --config PATH` and `python -m jobs.MOD --config PATH`, as documented
COMMANDS = _named(r"(?:larcq-ray |python -m jobs\.)([\w-]+)\s+--config[ =]((?:configs|cluster)/[\w./-]+\.ya?ml)")


def test_the_regexes_found_something():
    assert "run" in JOB_MODULES and "benchmark" in JOB_MODULES
    assert "configs/benchmark_clotho.yaml" in CONFIG_PATHS
    assert "larcq_ray.rerank.app:app_builder" in IMPORT_PATHS
    assert ("benchmark", "configs/benchmark_clotho.yaml") in COMMANDS


@pytest.mark.parametrize("module", JOB_MODULES)
def test_named_job_entrypoint_is_a_cli_command(module):
    from larcq_ray.cli import build_parser

    assert importlib.util.find_spec(f"jobs.{module}") is not None, f"python -m jobs.{module} is documented but missing"
    build_parser().parse_args([module.replace("_", "-"), "--config", "x.yaml"])  # SystemExit(2): no such command


@pytest.mark.parametrize("path", CONFIG_PATHS)
def test_named_config_validates(path):
    from larcq_ray.config import load_config

    load_config(REPO / path)


@pytest.mark.parametrize("command,path", COMMANDS, ids=[f"{c}:{p}" for c, p in COMMANDS])
def test_documented_command_parses_and_loads_its_config(command, path):
    from larcq_ray.cli import build_parser
    from larcq_ray.config import load_config

    args = build_parser().parse_args([command.replace("_", "-"), "--config", str(REPO / path)])
    load_config(args.config, args.set)


@pytest.mark.parametrize("import_path", IMPORT_PATHS)
def test_named_import_path_resolves(import_path):
    from ray._common.utils import import_attr

    assert callable(import_attr(import_path))  # as Serve resolves an import_path
