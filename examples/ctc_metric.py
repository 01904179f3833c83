"""Character accuracy of a CTC text recognizer: a task-metric plugin (`--metric examples.ctc_metric:char_accuracy`).

The model's output is per-position class scores (N, T, C): class 0 is the CTC blank, class k >= 1
is ALPHABET[k - 1]. Greedy decoding takes the best class per position, merges repeats and drops
blanks. Character accuracy over a set is 1 - (total edit distance) / (total label characters),
floored at 0: one wrong, missing or extra character costs one.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from examples.text_lines import ALPHABET

__all__ = ["greedy_decode", "edit_distance", "char_accuracy"]


def _scores(outputs: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """The (N, T, C) array, whether given alone or as the only output of a list."""
    if isinstance(outputs, (list, tuple)):
        if len(outputs) != 1:
            raise ValueError(f"char_accuracy expects one output (N, T, C), got {len(outputs)} outputs")
        outputs = outputs[0]
    scores = np.asarray(outputs)
    if scores.ndim != 3:
        raise ValueError(f"char_accuracy expects per-position class scores (N, T, C), got shape {scores.shape}")
    return scores


def greedy_decode(outputs: np.ndarray | Sequence[np.ndarray], alphabet: str = ALPHABET) -> list[str]:
    """Best path decoding of (N, T, C) scores: arg-max per position, merge repeats, drop blanks (0)."""
    scores = _scores(outputs)
    if scores.shape[2] != len(alphabet) + 1:
        raise ValueError(f"{scores.shape[2]} classes per position; the alphabet needs {len(alphabet) + 1} "
                         "(blank + characters)")
    best = scores.argmax(axis=2)
    keep = best != 0
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    return ["".join(alphabet[k - 1] for k in row[mask]) for row, mask in zip(best, keep)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions and substitutions all cost 1)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def char_accuracy(outputs: np.ndarray | Sequence[np.ndarray], labels: np.ndarray | Sequence[str] | None) -> float:
    """1 - sum of edit distances / sum of label lengths over the set, floored at 0 (higher is better).

    `labels` are the ground-truth strings (e.g. the `y` array of a lines npz, dtype `<U16`).
    """
    if labels is None:
        raise ValueError("char_accuracy needs labels: the ground-truth strings as `y` in the data")
    predicted = greedy_decode(outputs)
    truth = [str(s) for s in np.asarray(labels).reshape(-1)]
    if len(truth) != len(predicted):
        raise ValueError(f"{len(predicted)} outputs but {len(truth)} labels")
    chars = sum(len(s) for s in truth)
    if chars == 0:
        raise ValueError("the labels are all empty strings")
    errors = sum(edit_distance(p, t) for p, t in zip(predicted, truth))
    return max(0.0, 1.0 - errors / chars)
