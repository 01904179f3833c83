"""The architecture's import rules: passes/ is mechanism only; torch stays in bridge/ and the RL learners."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_ALLOWED = ("hirelc_onnx/bridge/", "hirelc_onnx/search/")  # the bridge, and the RL policies


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _sources(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _sources("passes"), ids=lambda p: p.name)
def test_passes_never_import_the_product(path):
    imports = _imports(path)
    assert "hirelc_onnx" not in imports
    assert not imports & {"torch", "onnx2torch", "sklearn"}


@pytest.mark.parametrize("path", _sources("hirelc_onnx"), ids=lambda p: str(p.relative_to(ROOT)))
def test_torch_only_in_bridge_and_search(path):
    rel = str(path.relative_to(ROOT))
    if rel.startswith(TORCH_ALLOWED):
        return
    assert not _imports(path) & {"torch", "onnx2torch", "torch_geometric"}, rel


# --- the import graph: acyclic, and lazy imports only where they defer a heavy dependency ----------

PROJECT = ("hirelc_onnx", "passes")
HEAVY = ("torch", "onnx2torch", "stable_baselines3", "torch_geometric", "sklearn")
"""Third-party packages that take seconds to import: a project module that pulls one in at import
time is imported inside the function that needs it, so `hirelc-onnx --help` and `inspect` start fast."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for package in PROJECT for p in _sources(package)}


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@dataclass(frozen=True)
class _Import:
    """One project module an import statement loads."""

    module: str
    line: int
    target: str
    named: bool  # written in the statement (not a parent package Python initialises first)
    local: bool  # inside a function body: runs when the function is called
    typing_only: bool  # under `if TYPE_CHECKING:`: never runs


def _imports_of(module: str) -> list[_Import]:
    """The project modules `module`'s import statements load: the named ones (`from pkg import sub`
    names pkg.sub, not pkg) and the parent packages initialised on the way, except `module`'s own
    (already initialising: a submodule importing a sibling is no edge to its package)."""
    tree = ast.parse(MODULES[module].read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    typing_only = {id(n) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[:None if MODULES[module].name == "__init__.py" else -1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            named = subs + ([base] if len(subs) < len(node.names) else [])
        else:
            continue
        seen = set()
        for name in named:
            for target in (*_ancestors(name), name):
                if target in MODULES and target != module and target not in _ancestors(module) and target not in seen:
                    seen.add(target)
                    found.append(_Import(module, node.lineno, target, target == name, id(node) in local,
                                         id(node) in typing_only))
    return found


def _third_party_at_import(module: str) -> set[str]:
    """Third-party modules `module` imports at module level (dotted names as written)."""
    tree = ast.parse(MODULES[module].read_text())
    later = {id(n) for f in ast.walk(tree) for n in ast.walk(f)
             if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             or isinstance(f, ast.If) and "TYPE_CHECKING" in ast.unparse(f.test)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in later:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] not in PROJECT}


def _registry_edges() -> set[str]:
    """The methods' run functions, imported by their "module:function" path when a method is chosen."""
    from hirelc_onnx.search.methods import METHODS

    return {m.run.split(":")[0] for m in METHODS.values()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    """Module-level and function-local imports alike (a cycle through a lazy import is still a
    cycle, only a later one); `if TYPE_CHECKING:` imports never run and are no edge."""
    edges = {m: {i.target for i in _imports_of(m) if not i.typing_only} for m in MODULES}
    edges["hirelc_onnx.search.methods"] |= _registry_edges()
    assert _cycles(edges) == []


def test_lazy_imports_only_defer_heavy_modules():
    """A project module is imported inside a function only when importing it loads a HEAVY package
    (itself or through the modules it imports); everything else is imported at the top, where a
    reader sees a module's dependencies."""
    at_import = {m: {i.target for i in _imports_of(m) if not (i.local or i.typing_only)} for m in MODULES}
    heavy = {m for m in MODULES
             if any(n == h or n.startswith(h + ".") for n in _third_party_at_import(m) for h in HEAVY)}
    grew = True
    while grew:
        grew = False
        for m, targets in at_import.items():
            if m not in heavy and targets & heavy:
                heavy.add(m)
                grew = True
    light = [f"{MODULES[i.module].relative_to(ROOT)}:{i.line} imports {i.target} inside a function"
             for m in MODULES if m.startswith("hirelc_onnx") for i in _imports_of(m)
             if i.local and i.named and i.target not in heavy]
    assert light == []
    assert {"hirelc_onnx.bridge", "hirelc_onnx.search.hirelc", "hirelc_onnx.search.graph_rl"} <= heavy
    assert not heavy & {"hirelc_onnx.compress", "hirelc_onnx.search.methods", "hirelc_onnx.cli"}
