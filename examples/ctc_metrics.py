"""A task metric for text-line recognizers trained with CTC: `compress --metric examples.ctc_metrics:character_accuracy`.

The recognizer outputs per-position class scores (N, T, C); class 0 is the CTC blank and class i
(i >= 1) is ALPHABET[i - 1]. Greedy decoding takes the arg-max at every position, merges repeats and
drops blanks; character accuracy is 1 - (edit distance to the label text, summed over lines) /
(label characters, summed), floored at 0: the figure OCR papers report as 1 - CER.
"""
from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np

__all__ = ["ALPHABET", "greedy_decode", "edit_distance", "character_accuracy"]

ALPHABET = string.digits + string.ascii_letters
"""Class i >= 1 of the recognizer is ALPHABET[i - 1]; class 0 is the blank."""


def greedy_decode(scores: np.ndarray, alphabet: str = ALPHABET) -> list[str]:
    """Best-path CTC decoding of (N, T, C) scores: arg-max per position, repeats merged, blanks dropped."""
    best = np.asarray(scores).argmax(axis=-1)
    lines = []
    for row in best:
        keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
        lines.append("".join(alphabet[i - 1] for i in row[keep] if i - 1 < len(alphabet)))
    return lines


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def character_accuracy(outputs: np.ndarray, labels: Sequence[str] | None) -> float:
    """1 - total edit distance / total label characters of the greedy decodes (labels: one text per line)."""
    if labels is None:
        raise ValueError("character accuracy needs the text of every line as labels (y)")
    texts = [str(t) for t in np.asarray(labels).reshape(-1)]
    decoded = greedy_decode(outputs)
    if len(decoded) != len(texts):
        raise ValueError(f"{len(decoded)} decoded lines but {len(texts)} labels")
    total = sum(len(t) for t in texts)
    errors = sum(edit_distance(d, t) for d, t in zip(decoded, texts))
    return max(0.0, 1.0 - errors / max(total, 1))
