"""The wheel that cluster images `pip install` holds every package and the demo models' weights (CLAP, captioner).

`make test` installs the project in editable mode, which reads the source tree directly and so
hides a package left out by `packages.find` or a package-data glob that matches nothing. This
test builds a real wheel and looks inside it.

The build runs on a copy of the source tree: setuptools builds in place (build/, *.egg-info), and
files a previous build left in build/lib would end up in the wheel and mask the very globs under
test; it also keeps the shared working tree clean.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = ("larcq_ray", "jobs")
# the demo CLAP's and the demo captioner's weight files (every file of those folders)
WEIGHTS_DIRS = ("larcq_ray/offline/demo_clap_weights", "larcq_ray/offline/demo_captioner_weights")
# other package data a pip-installed larcq_ray reads at run time
DATA_FILES = ("larcq_ray/search/page.html",)
# Build outputs, caches and environments: never part of a source checkout.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
    ".pytest_cache", ".ruff_cache", ".mypy_cache", "runs", "demo_run",
)


def expected_entries(root: Path) -> dict[str, list[str]]:
    """What the wheel must hold, by reason: package modules and the demo models' weight files."""
    modules = []
    for top in PACKAGE_ROOTS:
        for init in sorted((root / top).rglob("__init__.py")):
            pkg = init.parent
            if any(part in ("__pycache__",) or part.startswith(".") for part in pkg.relative_to(root).parts):
                continue
            modules += [p.relative_to(root).as_posix() for p in sorted(pkg.glob("*.py"))]
    weights = sorted(
        p.relative_to(root).as_posix() for d in WEIGHTS_DIRS for p in (root / d).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ) + [f for f in DATA_FILES if (root / f).is_file()]
    return {"modules": modules, "weights": weights}


def build_wheel(src: Path, out: Path) -> Path:
    try:
        import setuptools  # noqa: F401 - pyproject's build backend, used without build isolation
    except ImportError:
        pytest.fail(f"setuptools is not installed in {sys.prefix}: the wheel cannot be built without build "
                    "isolation (add setuptools to the `test` extra)")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"pip wheel failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels = sorted(out.glob("larcq_ray-*.whl"))
    assert len(wheels) == 1, f"expected one larcq_ray wheel in {out}, found {[w.name for w in out.iterdir()]}"
    return wheels[0]


def missing_from_wheel(wheel: Path, expected: dict[str, list[str]]) -> dict[str, list[str]]:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    return {kind: [e for e in entries if e not in names] for kind, entries in expected.items()}


def check_wheel(src: Path, tmp: Path) -> None:
    expected = expected_entries(src)
    # Guard against a vacuous pass: the source tree itself must have what is checked for.
    for top in PACKAGE_ROOTS:
        assert f"{top}/__init__.py" in expected["modules"], f"{src / top} is not a package"
    for d in WEIGHTS_DIRS:
        for pattern in ("*.json", "*.safetensors"):
            assert list((src / d).glob(pattern)), f"no {pattern} in {src / d}"
    for f in DATA_FILES:
        assert (src / f).is_file(), f"{src / f} is missing"

    wheel = build_wheel(src, tmp / "wheelhouse")
    missing = missing_from_wheel(wheel, expected)
    if any(missing.values()):
        lines = [f"{wheel.name} lacks files that `pip install` users need (see pyproject.toml "
                 "[tool.setuptools.packages.find] and [tool.setuptools.package-data]):"]
        if missing["modules"]:
            gone = sorted({m.rsplit("/", 1)[0] for m in missing["modules"] if m.endswith("/__init__.py")})
            if gone:
                lines.append(f"  packages ({len(gone)}):")
                lines += [f"    {pkg.replace('/', '.')}" for pkg in gone]
            partial = [m for m in missing["modules"] if m.rsplit("/", 1)[0] not in gone]
            if partial:
                lines.append(f"  modules of packages that are in the wheel ({len(partial)}):")
                lines += [f"    {m}" for m in partial]
        if missing["weights"]:
            lines.append(f"  demo model weights ({len(missing['weights'])}):")
            lines += [f"    {w}" for w in missing["weights"]]
        pytest.fail("\n".join(lines), pytrace=False)


def test_wheel_has_every_package_and_the_demo_weights(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE, symlinks=True)
    check_wheel(src, tmp_path)
