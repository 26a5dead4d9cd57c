"""Static check of larcq_ray's vLLM paths against the real vLLM package, without importing it.

vLLM has no CPU wheel and the GPU machine cannot install it, so the listwise-logprobs and pooling
re-rankers (rerank/backends.py) and the ray.data.llm refine (refine/engines.py) have never run.
This script downloads the vLLM wheel that cluster/Dockerfile pins (`pip download vllm==X --no-deps`,
cached under ~/.cache/larcq_vllm), reads its source with `ast` and checks that every vLLM name,
argument and keyword our code uses exists with that signature; likewise our ray.data.llm calls
against the installed Ray's source (found with importlib.util.find_spec, never imported).

What is checked, and where it comes from:
- calls read from our code's AST: `vllm.X(...)`, `self.llm.m(...)` (an `LLM` method), and names
  imported from `ray.data.llm`: each name must exist, each keyword must be a parameter (or a field
  of a dataclass / msgspec / pydantic class, or, where the callee takes **kwargs that vLLM forwards
  to EngineArgs, an EngineArgs field), and the positional count must fit;
- keys our code puts into a dict it splats into a call (`args.setdefault("K", ...)`, `args["K"] = `)
  and the dicts it hands on by name (ray.data.llm's engine_kwargs -> EngineArgs, sampling_params ->
  SamplingParams), also read from the AST;
- `vllm_engine_args` / `vllm_engine_kwargs` keys in configs/*.yaml (EngineArgs fields);
- what our code reads from vLLM's results (attributes) and the option values it passes
  (logprobs_mode "processed_logprobs", runner "pooling"), declared below in EXPECTED;
- the row columns ray.data.llm adds or reads (generated_text, __inference_error__, messages,
  sampling_params) as string literals in Ray's batch LLM source.

    python benchmarks/check_vllm_api.py              # downloads (once) and checks; exit 1 if any missing
    python benchmarks/check_vllm_api.py --wheel W    # a wheel or unpacked source folder already here

Last line: `vllm_api: version=X checked=N missing=M`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
OUR_FILES = ("larcq_ray/rerank/backends.py", "larcq_ray/refine/engines.py", "larcq_ray/refine/job.py")
CACHE = Path.home() / ".cache" / "larcq_vllm"

# Uses that are not calls: attributes of vLLM's results our code reads, option values it passes.
# (module, class, attribute) / (module, class, field, value)
EXPECTED_ATTRS = [
    ("vllm", "RequestOutput", "outputs", "rerank/backends.py: out.outputs[0]"),
    ("vllm", "CompletionOutput", "logprobs", "rerank/backends.py: out.outputs[0].logprobs"),
    ("vllm.logprobs", "Logprob", "logprob", "rerank/backends.py: lp.logprob"),
    ("vllm", "ScoringRequestOutput", "outputs", "rerank/backends.py: o.outputs.score"),
    ("vllm", "ScoringOutput", "score", "rerank/backends.py: o.outputs.score"),
]
EXPECTED_VALUES = [
    ("vllm", "EngineArgs", "logprobs_mode", "processed_logprobs", "rerank/backends.py: setdefault"),
    ("vllm", "EngineArgs", "runner", "pooling", "rerank/backends.py: runner == 'pooling'"),
]
# Dicts our code builds and hands to ray.data.llm, which passes them on to vLLM.
FORWARDED = {"engine_kwargs": ("vllm", "EngineArgs"), "sampling_params": ("vllm", "SamplingParams")}
# Callees whose **kwargs vLLM forwards to EngineArgs.
KWARGS_TO = {("vllm", "LLM"): ("vllm", "EngineArgs")}
RAY_COLUMNS = ("generated_text", "__inference_error__", "messages", "sampling_params")
RAY_LLM_SOURCE = "ray/llm/_internal/batch"
# Ray's own vLLM stage: the vLLM names it imports must exist in the pinned vLLM (Ray 2.60 vs vLLM X).
RAY_VLLM_STAGE = "ray/llm/_internal/batch/stages/vllm_engine_stage.py"


# -- a package's source, read with ast ---------------------------------------------------------------


class SourceTree:
    """Python files of one or more packages: {"vllm/entrypoints/llm.py": source, ...}."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self._ast: dict[str, Optional[ast.Module]] = {}
        self.dist_version: Optional[str] = None  # from a wheel's METADATA

    @classmethod
    def from_dir(cls, root: Path, package: str) -> "SourceTree":
        base = root / package
        return cls({str(p.relative_to(root)): p.read_text(errors="replace") for p in base.rglob("*.py")})

    @classmethod
    def from_wheel(cls, wheel: Path, package: str) -> "SourceTree":
        with zipfile.ZipFile(wheel) as z:
            tree = cls({n: z.read(n).decode("utf-8", "replace") for n in z.namelist()
                        if n.endswith(".py") and n.startswith(package + "/")})
            meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
            if meta:
                m = re.search(r"^Version:\s*(\S+)", z.read(meta[0]).decode("utf-8", "replace"), re.M)
                tree.dist_version = m.group(1) if m else None
        return tree

    def path_of(self, module: str) -> Optional[str]:
        p = module.replace(".", "/")
        for cand in (p + ".py", p + "/__init__.py"):
            if cand in self.files:
                return cand
        return None

    def module(self, module: str) -> Optional[ast.Module]:
        path = self.path_of(module)
        if path is None:
            return None
        if path not in self._ast:
            try:
                self._ast[path] = ast.parse(self.files[path])
            except SyntaxError:
                self._ast[path] = None
        return self._ast[path]

    def version(self, package: str) -> str:
        if self.dist_version:
            return self.dist_version
        src = self.files.get(f"{package}/_version.py", "") + self.files.get(f"{package}/version.py", "")
        m = re.search(r"""(?:__version__|version)\s*(?::\s*str)?\s*=\s*['"]([^'"]+)['"]""", src)
        return m.group(1) if m else "?"

    # -- names -------------------------------------------------------------------------------------

    def resolve(self, module: str, name: str, depth: int = 0):
        """(module, node) where `module.name` is defined: a ClassDef / FunctionDef / Assign / AnnAssign,
        or ("module", None) for a submodule; None when it does not exist. Follows `from x import`,
        vLLM's lazy MODULE_ATTRS table and re-exports."""
        if depth > 12:
            return None
        tree = self.module(module)
        if tree is None:
            return None
        found = None
        for node in _top_level(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                found = (module, node)
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                found = found or (module, node)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                found = found or (module, node)
        if found:
            return found
        for node in _top_level(tree):
            if isinstance(node, ast.ImportFrom):
                src = _absolute(module, node, self.path_of(module))
                for a in node.names:
                    if (a.asname or a.name) == name:
                        r = self.resolve(src, a.name, depth + 1)
                        if r is not None:
                            return r
                        if self.path_of(f"{src}.{a.name}"):
                            return (f"{src}.{a.name}", None)
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "MODULE_ATTRS"
                                                      for t in node.targets) and isinstance(node.value, ast.Dict):
                for k, v in zip(node.value.keys, node.value.values):
                    if isinstance(k, ast.Constant) and k.value == name and isinstance(v, ast.Constant):
                        mod, _, attr = str(v.value).partition(":")
                        pkg = module if self.path_of(module).endswith("__init__.py") else module.rpartition(".")[0]
                        mod = _join_relative(pkg, mod) if mod.startswith(".") else mod
                        return self.resolve(mod, attr or name, depth + 1)
        if self.path_of(f"{module}.{name}"):
            return (f"{module}.{name}", None)
        return None

    def resolve_dotted(self, dotted: str):
        """'vllm.LLM' or 'vllm.logprobs.Logprob' -> (module, node)."""
        parts = dotted.split(".")
        for i in range(len(parts) - 1, 0, -1):
            mod, rest = ".".join(parts[:i]), parts[i:]
            if self.path_of(mod) is None:
                continue
            r = self.resolve(mod, rest[0])
            for extra in rest[1:]:
                if r is None or r[1] is not None:
                    return None
                r = self.resolve(r[0], extra)
            return r
        return None

    # -- classes ---------------------------------------------------------------------------------

    def mro(self, module: str, cls: ast.ClassDef, depth: int = 0) -> list[tuple[str, ast.ClassDef]]:
        """The class and its resolvable bases, depth first (close enough to Python's MRO here)."""
        out = [(module, cls)]
        if depth > 10:
            return out
        for b in cls.bases:
            if isinstance(b, ast.Subscript):  # Generic[...] / PoolingRequestOutput[ScoringOutput]
                b = b.value
            dotted = _dotted(b)
            if not dotted:
                continue
            head, _, tail = dotted.partition(".")
            r = self.resolve(module, head)
            for part in [p for p in tail.split(".") if p]:
                r = self.resolve(r[0], part) if r and r[1] is None else None
            if r and isinstance(r[1], ast.ClassDef):
                out += [x for x in self.mro(r[0], r[1], depth + 1) if x not in out]
        return out

    def method(self, module: str, cls: ast.ClassDef, name: str):
        for mod, c in self.mro(module, cls):
            for node in c.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                    return mod, node
        return None

    def fields(self, module: str, cls: ast.ClassDef) -> dict[str, tuple[str, ast.AnnAssign]]:
        """Class-level annotated names (dataclass / msgspec.Struct / pydantic fields), all bases."""
        out: dict[str, tuple[str, ast.AnnAssign]] = {}
        for mod, c in reversed(self.mro(module, cls)):
            for node in c.body:
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    if not _is_classvar(node.annotation):
                        out[node.target.id] = (mod, node)
        return out

    def attributes(self, module: str, cls: ast.ClassDef) -> set[str]:
        """Fields, properties / methods, and `self.x = ...` in any method, over all bases."""
        names = set(self.fields(module, cls))
        for _, c in self.mro(module, cls):
            for node in c.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(node.name)
                    for sub in ast.walk(node):
                        if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) \
                                and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                            names.add(sub.attr)
                elif isinstance(node, ast.Assign):
                    names.update(t.id for t in node.targets if isinstance(t, ast.Name))
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
        return names

    def literal_values(self, module: str, annotation: ast.expr, depth: int = 0) -> set[str]:
        """String values a Literal[...] / Enum annotation allows, following aliases across modules."""
        out: set[str] = set()
        if depth > 8 or annotation is None:
            return out
        for node in ast.walk(annotation):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
            elif isinstance(node, ast.Name) and node.id not in ("Literal", "Optional", "Union", "str", "None"):
                r = self.resolve(module, node.id)
                if r is None or r[1] is None:
                    continue
                mod, target = r
                if isinstance(target, (ast.Assign, ast.AnnAssign)) and target.value is not None:
                    out |= self.literal_values(mod, target.value, depth + 1)
                elif isinstance(target, ast.ClassDef):  # an Enum: its members' values
                    for item in target.body:
                        if isinstance(item, ast.Assign) and isinstance(item.value, ast.Constant) \
                                and isinstance(item.value.value, str):
                            out.add(item.value.value)
                            out.update(t.id.lower() for t in item.targets if isinstance(t, ast.Name))
        return out

    def string_constants(self, prefix: str) -> set[str]:
        out: set[str] = set()
        for path in self.files:
            if path.startswith(prefix) and path.endswith(".py"):
                tree = self.module(path[:-3].replace("/", ".").removesuffix(".__init__"))
                if tree is not None:
                    out |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        return out


def _top_level(tree: ast.Module) -> Iterable[ast.stmt]:
    """Module-level statements, including those under if / try / else (TYPE_CHECKING, fallbacks)."""
    stack = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If):
            stack += list(reversed(node.body + node.orelse))
        elif isinstance(node, ast.Try):
            stack += list(reversed(node.body + [s for h in node.handlers for s in h.body] + node.orelse))


def _join_relative(package: str, rel: str) -> str:
    level = len(rel) - len(rel.lstrip("."))
    base = package.split(".")
    base = base[:len(base) - (level - 1)] if level > 1 else base
    rest = rel.lstrip(".")
    return ".".join(base + ([rest] if rest else []))


def _absolute(module: str, node: ast.ImportFrom, path: Optional[str]) -> str:
    if not node.level:
        return node.module or ""
    pkg = module if path and path.endswith("__init__.py") else module.rpartition(".")[0]
    return _join_relative(pkg, "." * node.level + (node.module or ""))


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _is_classvar(annotation: ast.expr) -> bool:
    return "ClassVar" in ast.unparse(annotation)


# -- signatures ----------------------------------------------------------------------------------


@dataclass
class Signature:
    where: str
    positional: list[str]  # after self / cls
    keywords: set[str]  # names that can be passed by keyword
    varargs: bool = False
    varkw: bool = False


def signature_of(tree: SourceTree, module: str, node, method: Optional[str] = None) -> Optional[Signature]:
    """The call signature of a function, a method, or a class (its __init__, else its fields)."""
    if isinstance(node, ast.ClassDef):
        if method is not None:
            m = tree.method(module, node, method)
            return _func_signature(f"{m[0]}.{node.name}.{method}", m[1], drop_first=True) if m else None
        init = tree.method(module, node, "__init__")
        fields = tree.fields(module, node)
        if init is not None:
            sig = _func_signature(f"{init[0]}.{node.name}.__init__", init[1], drop_first=True)
            if sig.varkw and fields:  # pydantic-style __init__(**data): the fields are the keywords
                sig.keywords |= set(fields)
            return sig
        return Signature(f"{module}.{node.name} (fields)", [], set(fields))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return _func_signature(f"{module}.{node.name}", node, drop_first=False)
    return None


def _func_signature(where: str, fn, drop_first: bool) -> Signature:
    a = fn.args
    pos = [x.arg for x in a.posonlyargs + a.args]
    if drop_first and pos:
        pos = pos[1:]
    kw = {x.arg for x in a.args + a.kwonlyargs} - {"self", "cls"}
    return Signature(where, pos, kw, varargs=a.vararg is not None, varkw=a.kwarg is not None)


# -- our uses ------------------------------------------------------------------------------------


@dataclass
class Use:
    target: str  # "vllm.LLM", "vllm.LLM.generate", "ray.data.llm.build_processor"
    where: str  # file:line
    n_positional: int = 0
    keywords: list[str] = field(default_factory=list)
    kind: str = "call"  # call | name | attr | value | kwargs | column
    value: str = ""


def our_uses(sources: dict[str, str]) -> list[Use]:
    """The vLLM and ray.data.llm calls in our code, read from its AST."""
    uses: list[Use] = []
    for path, text in sources.items():
        tree = ast.parse(text)
        ray_llm = {a.asname or a.name: a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and n.module == "ray.data.llm" for a in n.names}
        vllm_from = {a.asname or a.name: a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                     and n.module == "vllm" for a in n.names}
        for name in ray_llm.values():
            uses.append(Use(f"ray.data.llm.{name}", f"{path}", kind="name"))
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            dict_keys = _dict_keys(fn)
            for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call)]:
                target = _call_target(call.func, ray_llm, vllm_from)
                if target is None:
                    continue
                where = f"{path}:{call.lineno}"
                kws = [k.arg for k in call.keywords if k.arg]
                uses.append(Use(target, where, sum(not isinstance(a, ast.Starred) for a in call.args), kws))
                for k in call.keywords:
                    if k.arg is None and isinstance(k.value, ast.Name):  # **args: the keys we set in it
                        keys = dict_keys.get(k.value.id, {}).get("set", [])
                        if keys:
                            uses.append(Use(target, where, 0, keys, kind="kwargs"))
                    elif k.arg in FORWARDED and isinstance(k.value, ast.Name):
                        keys = dict_keys.get(k.value.id, {}).get("set", [])
                        if keys:
                            uses.append(Use(".".join(FORWARDED[k.arg]), where, 0, keys, kind="forwarded"))
            # dicts handed to ray.data.llm rows by key (preprocess: sampling_params=dict(sampling))
            for call in [n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                         and n.func.id == "dict"]:
                for k in call.keywords:
                    if k.arg in FORWARDED:
                        src = k.value.args[0] if isinstance(k.value, ast.Call) and k.value.args else k.value
                        if isinstance(src, ast.Name):
                            keys = _keys_anywhere(tree, src.id)
                            if keys:
                                uses.append(Use(".".join(FORWARDED[k.arg]), f"{path}:{call.lineno}", 0, keys,
                                                kind="forwarded"))
        # vllm.X attribute reads that are not calls (e.g. a type used in isinstance)
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "vllm":
                uses.append(Use(f"vllm.{n.attr}", f"{path}:{n.lineno}", kind="name"))
    return _dedupe(uses)


def _call_target(func: ast.expr, ray_llm: dict, vllm_from: dict) -> Optional[str]:
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "vllm":
        return f"vllm.{func.attr}"
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute) and func.value.attr == "llm" \
            and isinstance(func.value.value, ast.Name) and func.value.value.id == "self":
        return f"vllm.LLM.{func.attr}"  # self.llm = vllm.LLM(...)
    if isinstance(func, ast.Name) and func.id in ray_llm:
        return f"ray.data.llm.{ray_llm[func.id]}"
    if isinstance(func, ast.Name) and func.id in vllm_from:
        return f"vllm.{vllm_from[func.id]}"
    return None


def _dict_keys(fn) -> dict[str, dict[str, list[str]]]:
    """Per local dict name: keys our code sets in it (setdefault / [k] = / dict(k=) / {k: } / update(k=))."""
    out: dict[str, dict[str, list[str]]] = {}

    def add(name: str, key: str) -> None:
        keys = out.setdefault(name, {"set": []})["set"]
        if key not in keys:
            keys.append(key)

    for n in ast.walk(fn):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name):
            if n.func.attr == "setdefault" and n.args and isinstance(n.args[0], ast.Constant):
                add(n.func.value.id, str(n.args[0].value))
            elif n.func.attr == "update":
                for k in n.keywords:
                    if k.arg:
                        add(n.func.value.id, k.arg)
        elif isinstance(n, ast.Assign):
            for t in n.targets:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and isinstance(t.slice, ast.Constant):
                    add(t.value.id, str(t.slice.value))
                elif isinstance(t, ast.Name) and isinstance(n.value, ast.Dict):
                    for k in n.value.keys:
                        if isinstance(k, ast.Constant):
                            add(t.id, str(k.value))
                elif isinstance(t, ast.Name) and isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Name) \
                        and n.value.func.id == "dict":
                    for k in n.value.keywords:
                        if k.arg:
                            add(t.id, k.arg)
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is not None:
            if isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Name) and n.value.func.id == "dict":
                for k in n.value.keywords:
                    if k.arg:
                        add(n.target.id, k.arg)
            elif isinstance(n.value, ast.Dict):
                for k in n.value.keys:
                    if isinstance(k, ast.Constant):
                        add(n.target.id, str(k.value))
    return out


def _keys_anywhere(tree: ast.Module, name: str) -> list[str]:
    keys: list[str] = []
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        for k in _dict_keys(fn).get(name, {}).get("set", []):
            if k not in keys:
                keys.append(k)
    return keys


def _dedupe(uses: list[Use]) -> list[Use]:
    seen, out = set(), []
    for u in uses:
        key = (u.target, u.kind, u.n_positional, tuple(u.keywords), u.value, u.where.split(":")[0])
        if key not in seen:
            seen.add(key)
            out.append(u)
    return out


def config_keys(configs: dict[str, str]) -> list[Use]:
    """vllm_engine_args / vllm_engine_kwargs keys in our YAML configs (EngineArgs fields)."""
    import yaml

    uses = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("vllm_engine_args", "vllm_engine_kwargs") and isinstance(v, dict) and v:
                    uses.append(Use("vllm.EngineArgs", path, 0, list(v), kind="forwarded"))
                walk(v, path)
        elif isinstance(node, list):
            for v in node:
                walk(v, path)

    for path, text in configs.items():
        try:
            walk(yaml.safe_load(text), path)
        except yaml.YAMLError:
            continue
    return uses


# -- checking ------------------------------------------------------------------------------------


@dataclass
class Row:
    use: str
    where: str
    status: str  # ok | missing
    detail: str


def _tree_for(target: str, trees: dict[str, SourceTree]) -> Optional[SourceTree]:
    return trees.get(target.split(".")[0])


def _resolve_target(tree: SourceTree, target: str):
    """(module, node, method) for 'vllm.LLM.generate' style targets."""
    r = tree.resolve_dotted(target)
    if r is not None:
        return r[0], r[1], None
    owner, _, meth = target.rpartition(".")
    r = tree.resolve_dotted(owner)
    if r is not None and isinstance(r[1], ast.ClassDef):
        return r[0], r[1], meth
    return None


def check_use(use: Use, trees: dict[str, SourceTree]) -> list[Row]:
    tree = _tree_for(use.target, trees)
    if tree is None:
        return [Row(use.target, use.where, "missing", "package source not available")]
    resolved = _resolve_target(tree, use.target)
    if resolved is None:
        return [Row(use.target, use.where, "missing", "no such name")]
    module, node, method = resolved
    if use.kind == "name":
        return [Row(use.target, use.where, "ok", f"defined in {module}")]
    if method is not None:
        found = tree.method(module, node, method)
        if found is None:
            return [Row(use.target, use.where, "missing", f"{node.name} has no method {method!r}")]
    sig = signature_of(tree, module, node, method)
    if sig is None:
        return [Row(use.target, use.where, "missing", "not callable (no def / class found)")]
    rows = []
    label = use.target if use.kind == "call" else f"{use.target} ({use.kind})"
    if use.kind == "call":
        ok = use.n_positional <= len(sig.positional) or sig.varargs
        rows.append(Row(f"{label} ({use.n_positional} positional)", use.where, "ok" if ok else "missing",
                        f"{sig.where} takes {len(sig.positional)} positional"))
    forward = KWARGS_TO.get(tuple(use.target.rsplit(".", 1)))  # ("vllm", "LLM")
    fields = None
    if forward and sig.varkw:
        fr = trees["vllm"].resolve_dotted(".".join(forward))
        if fr and isinstance(fr[1], ast.ClassDef):
            fields = set(trees["vllm"].fields(fr[0], fr[1]))
    for kw in use.keywords:
        if kw in sig.keywords:
            rows.append(Row(f"{label}({kw}=)", use.where, "ok", sig.where))
        elif fields is not None and kw in fields:
            rows.append(Row(f"{label}({kw}=)", use.where, "ok", f"**kwargs -> {'.'.join(forward)} field"))
        elif sig.varkw and fields is None and use.kind == "call":
            rows.append(Row(f"{label}({kw}=)", use.where, "ok", f"{sig.where} takes **kwargs (unchecked)"))
        else:
            where_to = f"{sig.where} or {'.'.join(forward)} fields" if fields is not None else sig.where
            rows.append(Row(f"{label}({kw}=)", use.where, "missing", f"no parameter {kw!r} in {where_to}"))
    return rows


def check_attr(module: str, cls: str, attr: str, where: str, tree: SourceTree) -> Row:
    r = tree.resolve_dotted(f"{module}.{cls}")
    if r is None or not isinstance(r[1], ast.ClassDef):
        return Row(f"{module}.{cls}.{attr}", where, "missing", f"no class {cls}")
    ok = attr in tree.attributes(r[0], r[1])
    return Row(f"{module}.{cls}.{attr}", where, "ok" if ok else "missing",
               f"{r[0]}.{cls}" + ("" if ok else f" has no attribute {attr!r}"))


def check_value(module: str, cls: str, fname: str, value: str, where: str, tree: SourceTree) -> Row:
    label = f"{module}.{cls}.{fname} = {value!r}"
    r = tree.resolve_dotted(f"{module}.{cls}")
    if r is None or not isinstance(r[1], ast.ClassDef):
        return Row(label, where, "missing", f"no class {cls}")
    f = tree.fields(r[0], r[1]).get(fname)
    if f is None:
        return Row(label, where, "missing", f"{cls} has no field {fname!r}")
    allowed = tree.literal_values(f[0], f[1].annotation)
    ok = value in allowed
    return Row(label, where, "ok" if ok else "missing",
               f"allowed: {', '.join(sorted(allowed)[:8])}" + (" ..." if len(allowed) > 8 else ""))


def run_checks(trees: dict[str, SourceTree], sources: dict[str, str], configs: Optional[dict[str, str]] = None,
               attrs=EXPECTED_ATTRS, values=EXPECTED_VALUES, ray_columns=RAY_COLUMNS) -> list[Row]:
    rows: list[Row] = []
    uses = our_uses(sources) + config_keys(configs or {})
    for u in uses:
        rows += check_use(u, trees)
    if "vllm" in trees:
        rows += [check_attr(m, c, a, w, trees["vllm"]) for m, c, a, w in attrs]
        rows += [check_value(m, c, f, v, w, trees["vllm"]) for m, c, f, v, w in values]
    if "ray" in trees and any(u.target.startswith("ray.data.llm") for u in uses):
        consts = trees["ray"].string_constants(RAY_LLM_SOURCE)
        rows += [Row(f"ray.data.llm row column {c!r}", "refine/engines.py, refine/job.py",
                     "ok" if c in consts else "missing", f"a string in {RAY_LLM_SOURCE}") for c in ray_columns]
        if "vllm" in trees and RAY_VLLM_STAGE in trees["ray"].files:
            rows += ray_vllm_imports(trees["ray"].files[RAY_VLLM_STAGE], trees["vllm"])
    return rows


def ray_vllm_imports(source: str, vtree: SourceTree) -> list[Row]:
    """Each vLLM name Ray's vLLM stage imports must resolve in the pinned vLLM; a name imported from
    several modules (try / except fallbacks for older vLLMs) needs one of them."""
    where: dict[str, list[str]] = {}
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "vllm" and not n.level:
            for a in n.names:
                where.setdefault(a.name, []).append(n.module)
    rows = []
    for name, mods in where.items():
        hit = next((m for m in mods if vtree.resolve(m, name) is not None), None)
        rows.append(Row(f"ray's vLLM stage imports {name}", RAY_VLLM_STAGE.rsplit("/", 1)[1],
                        "ok" if hit else "missing", f"from {hit}" if hit else f"not in {', '.join(mods)}"))
    return rows


# -- the wheel -----------------------------------------------------------------------------------


def pinned_version(dockerfile: Path = ROOT / "cluster" / "Dockerfile") -> str:
    m = re.search(r"\bvllm==([0-9][^\s\\\"']*)", dockerfile.read_text())
    if not m:
        raise SystemExit(f"{dockerfile} does not pin vllm (pip install vllm==X)")
    return m.group(1)


def fetch_wheel(version: str, cache: Path = CACHE) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    have = sorted(cache.glob(f"vllm-{version}-*.whl"))
    if have:
        return have[0]
    subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps", "--only-binary=:all:",
                    "-q", "-d", str(cache)], check=True)
    have = sorted(cache.glob(f"vllm-{version}-*.whl"))
    if not have:
        raise SystemExit(f"pip download put no vllm-{version} wheel in {cache}")
    return have[0]


def installed_tree(package: str) -> Optional[SourceTree]:
    spec = importlib.util.find_spec(package)  # a top-level package: located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0])
    return SourceTree.from_dir(base.parent, package)


def print_table(rows: list[Row]) -> None:
    w = max([len(r.use) for r in rows] + [10])
    print(f"{'use':{w}}  {'status':7}  {'where':44}  detail")
    for r in rows:
        print(f"{r.use:{w}}  {r.status:7}  {r.where[:44]:44}  {r.detail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", help="a vllm wheel or an unpacked source folder (default: download the pinned one)")
    ap.add_argument("--version", help="vllm version (default: the one cluster/Dockerfile pins)")
    a = ap.parse_args(argv)
    version = a.version or pinned_version()
    if a.wheel and Path(a.wheel).is_dir():
        vtree = SourceTree.from_dir(Path(a.wheel), "vllm")
    else:
        vtree = SourceTree.from_wheel(Path(a.wheel) if a.wheel else fetch_wheel(version), "vllm")
    trees = {"vllm": vtree}
    rtree = installed_tree("ray")
    if rtree is not None:
        trees["ray"] = rtree
    sources = {p: (ROOT / p).read_text() for p in OUR_FILES}
    configs = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "configs").glob("*.yaml"))}
    rows = run_checks(trees, sources, configs)
    print_table(rows)
    missing = sum(r.status != "ok" for r in rows)
    ray_v = rtree.version("ray") if rtree else "not installed"
    print(f"(vllm source: {len(vtree.files)} files; ray {ray_v} from the installed package)")
    print(f"vllm_api: version={vtree.version('vllm') if vtree.version('vllm') != '?' else version} "
          f"checked={len(rows)} missing={missing}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
