"""docs/ARCHITECTURE.md stays true: every path it names exists, and it names every module a newcomer meets."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _named_paths(text: str) -> set[str]:
    """Backticked repository paths: `hirelc_onnx/x.py`, `passes/`, `tests/...` (a `: symbol` suffix dropped)."""
    paths = set()
    for span in re.findall(r"`([^`]+)`", text):
        head = span.split(":")[0].strip()
        if re.fullmatch(r"(hirelc_onnx|passes|tests|examples|bench|docs)(/[\w.]+)*/?", head):
            paths.add(head)
    return paths


def _module_names(text: str) -> set[str]:
    """Module file names the doc mentions, bare (`loader.py`) or as paths."""
    return {Path(span.split(":")[0]).name for span in re.findall(r"`([^`]+\.py)", text)}


def test_every_path_the_doc_names_exists():
    text = DOC.read_text()
    paths = _named_paths(text)
    assert len(paths) > 30
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_the_doc_names_every_module():
    named = _module_names(DOC.read_text())
    modules = [p for folder in ("hirelc_onnx", "passes") for p in (ROOT / folder).rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")]
    unnamed = sorted(str(p.relative_to(ROOT)) for p in modules if p.name not in named)
    assert not unnamed, f"docs/ARCHITECTURE.md does not mention: {unnamed}"


def test_readme_links_the_doc_and_nothing_points_outside_the_repo():
    readme = (ROOT / "README.md").read_text()
    assert "docs/ARCHITECTURE.md" in readme
    for path in [ROOT / "README.md", DOC, *(ROOT / "hirelc_onnx").rglob("*.py"), *(ROOT / "passes").rglob("*.py")]:
        text = path.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, path
