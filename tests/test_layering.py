"""The architecture's import rules: passes/ is mechanism only; torch stays in bridge/ and the RL learners."""
from __future__ import annotations

import ast
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
