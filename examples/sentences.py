"""English sentences for text encoders, taken from the docstrings installed packages ship (offline).

The prose parts of docstrings (summary and description paragraphs, never parameter tables, code
or examples) of pinned packages are split into sentences, filtered to plain sentences of 5-20
words, and deduplicated case-insensitively, in sorted-file order: the same list on every machine
with the same package versions. scikit-learn and NumPy give about 3,800.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path

__all__ = ["SENTENCE_PACKAGES", "MIN_WORDS", "MAX_WORDS", "docstring_sentences", "sentence_corpus"]

SENTENCE_PACKAGES: tuple[str, ...] = ("sklearn", "numpy")
MIN_WORDS, MAX_WORDS = 5, 20

_UNDERLINE = re.compile(r"^\s*(-{3,}|={3,}|~{3,})\s*$")  # numpydoc / reST section underline
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# A plain sentence: capitalised, words, digits and light punctuation, ending with a full stop
# (no code, markup, formulas or references).
_PLAIN = re.compile(r"^[A-Z][A-Za-z0-9 ,;'\-]+\.$")
_NOT_PROSE = (">>>", "..", ":", "-", "*", "|", "[")


def _prose_paragraphs(doc: str) -> list[str]:
    """Paragraphs before the first section header, skipping code, directives and list items."""
    lines = doc.splitlines()
    paragraphs: list[str] = []
    current: list[str] = []
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]):
            break  # "Parameters\n----------" and what follows is not prose
        text = line.strip()
        if not text or text.startswith(_NOT_PROSE) or _UNDERLINE.match(line):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(text)
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def _package_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package {package!r} is not installed")
    return Path(spec.origin).parent


def docstring_sentences(packages: tuple[str, ...] = SENTENCE_PACKAGES) -> list[str]:
    """Sentences from the docstrings of `packages` (parsed with ast, nothing imported), in order.

    Files are read in sorted order, test folders skipped; a sentence is kept once (case-insensitive).
    """
    seen: set[str] = set()
    out: list[str] = []
    for package in packages:
        root = _package_root(package)
        for path in sorted(root.rglob("*.py")):
            if "tests" in path.relative_to(root).parts:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                for paragraph in _prose_paragraphs(doc) if doc else ():
                    for sentence in _SENTENCE_END.split(paragraph):
                        sentence = " ".join(sentence.split())
                        key = sentence.lower()
                        if (MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and _PLAIN.match(sentence)
                                and key not in seen):
                            seen.add(key)
                            out.append(sentence)
    return out


@functools.lru_cache(maxsize=4)
def _cached(packages: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(docstring_sentences(packages))


def sentence_corpus(n: int | None = None, packages: tuple[str, ...] = SENTENCE_PACKAGES) -> list[str]:
    """The first `n` (default all) sentences of `packages`' docstrings; computed once per process."""
    sentences = _cached(tuple(packages))
    if n is not None and n > len(sentences):
        raise ValueError(f"asked for {n} sentences; {packages} give {len(sentences)}")
    return list(sentences[:n])
