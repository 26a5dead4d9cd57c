"""The house rules of the package layout, checked on every import statement (module level, inside
functions, under TYPE_CHECKING): no import circles; product code never imports the offline kit
(the CLI's `demo` command is the one door); loading a config stays cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import larcq_ray

PKG = Path(larcq_ray.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported larcq_ray module, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("larcq_ray"):
                while t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in known and t != name:
                    out.append((t, node.lineno))
    return out


def _graph() -> dict[str, list[tuple[str, int]]]:
    mods = _modules()
    return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def _cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions_and_type_checking(tmp_path):
    src = tmp_path / "larcq_ray" / "x.py"
    src.parent.mkdir()
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from larcq_ray.a import B\n"
                   "def f():\n    import larcq_ray.c.d\n    from larcq_ray.c import e\n")
    got = {t for t, _ in _imports(src, "larcq_ray.x", {"larcq_ray.a", "larcq_ray.c.d", "larcq_ray.c.e", "larcq_ray.c"})}
    assert got == {"larcq_ray.a", "larcq_ray.c.d", "larcq_ray.c.e"}
    assert _cycles({"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)], "d": [("a", 1)]}) == [["a", "b", "c"]]


def test_no_import_circles():
    cycles = _cycles(_graph())
    assert not cycles, f"import circles: {cycles}"


def test_product_code_never_imports_the_offline_kit():
    graph = _graph()
    offenders = [f"{mod} imports {dep} (line {line})" for mod, deps in graph.items() for dep, line in deps
                 if dep.startswith("larcq_ray.offline") and not mod.startswith("larcq_ray.offline")]
    # The CLI's `demo` command is the one door into the kit.
    assert offenders == ["larcq_ray.cli imports larcq_ray.offline.demo (line %d)" % next(
        line for dep, line in graph["larcq_ray.cli"] if dep == "larcq_ray.offline.demo")], offenders


def test_every_package_opens_with_a_docstring():
    for init in PKG.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def test_loading_a_config_imports_neither_serve_nor_fastapi(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run_dir: x\nindex: {batch_size: 4}\nserve: {port: 8123}\n")
    code = ("import sys; from larcq_ray.config import load_config; load_config(sys.argv[1]); "
            "print(sorted(m for m in ('ray.serve', 'fastapi', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_import_of_a_larcq_ray_name_resolves():
    """Imports inside functions run late (in a Ray worker, mid-job): check them all now."""
    import importlib

    missing = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("larcq_ray") and not node.level:
                mod = importlib.import_module(node.module)
                for a in node.names:
                    if not hasattr(mod, a.name):
                        try:
                            importlib.import_module(f"{node.module}.{a.name}")
                        except ImportError:
                            missing.append(f"{name}:{node.lineno}: {node.module}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("larcq_ray"):
                        try:
                            importlib.import_module(a.name)
                        except ImportError:
                            missing.append(f"{name}:{node.lineno}: {a.name}")
    assert not missing, missing
