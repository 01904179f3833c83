"""The CTC character-accuracy plugin against hand-decoded lines."""
from __future__ import annotations

import numpy as np
import pytest

from examples.ctc_metrics import ALPHABET, character_accuracy, edit_distance, greedy_decode
from hirelc_onnx.evaluate.objective import Objective


def _scores(paths: list[list[int]], classes: int = len(ALPHABET) + 1) -> np.ndarray:
    """(N, T, C) one-hot-ish scores whose arg-max path is `paths`."""
    out = np.zeros((len(paths), len(paths[0]), classes))
    for n, path in enumerate(paths):
        out[n, np.arange(len(path)), path] = 3.0
    return out


def test_greedy_decode_merges_repeats_and_drops_blanks():
    a, b, one = ALPHABET.index("a") + 1, ALPHABET.index("b") + 1, ALPHABET.index("1") + 1
    scores = _scores([[a, a, 0, a, b, b, 0], [one, 0, 0, one, one, 0, 0]])
    assert greedy_decode(scores) == ["aab", "11"]


def test_edit_distance_and_character_accuracy_by_hand():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "ab") == 2
    a, b = ALPHABET.index("a") + 1, ALPHABET.index("b") + 1
    scores = _scores([[a, 0, b, 0], [b, b, 0, 0]])  # decodes "ab" and "b"
    labels = np.array(["ab", "ba"])  # second line: one deletion -> 1 error in 4 characters
    assert character_accuracy(scores, labels) == pytest.approx(1 - 1 / 4)
    with pytest.raises(ValueError, match="needs the text"):
        character_accuracy(scores, None)


def test_the_plugin_is_an_objective_with_string_labels():
    a = ALPHABET.index("a") + 1
    ref = _scores([[a, 0, a, 0]] * 3)
    obj = Objective.build(["scores"], [None], ref, np.array(["aa"] * 3), metric="examples.ctc_metrics:character_accuracy")
    assert obj.kinds == ("sequence-scores",) and obj.label_output is None
    assert obj.score(ref, ref, np.array(["aa"] * 3)) == 1.0
    assert obj.score(ref, ref, np.array(["a"] * 3)) == 0.0  # one extra character per 1-character line
