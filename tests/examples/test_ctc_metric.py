"""The character-accuracy plugin: greedy CTC decoding and edit distance on hand-built scores."""
from __future__ import annotations

import numpy as np
import pytest

from examples.ctc_metric import char_accuracy, edit_distance, greedy_decode
from examples.text_lines import ALPHABET

C = len(ALPHABET) + 1  # blank + characters


def _scores(paths: list[str]) -> np.ndarray:
    """(N, T, C) one-hot-ish scores whose arg-max path is given per position ('-' = blank)."""
    t = max(len(p) for p in paths)
    out = np.random.default_rng(0).normal(0.0, 0.1, (len(paths), t, C)).astype(np.float32)
    for n, path in enumerate(paths):
        for i, ch in enumerate(path.ljust(t, "-")):
            out[n, i, 0 if ch == "-" else ALPHABET.index(ch) + 1] = 5.0
    return out


def test_greedy_decode_merges_repeats_and_drops_blanks():
    # "aa-ab" -> a, a (after a blank), b; "-77-7" -> 7, 7; "----" -> ""; "zz0" -> z0
    assert greedy_decode(_scores(["aa-ab", "-77-7", "----", "zz0"])) == ["aab", "77", "", "z0"]
    assert greedy_decode([_scores(["xy"])]) == ["xy"]  # a list holding the only output


def test_edit_distance_by_hand():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3
    assert edit_distance("abc", "abc") == 0 and edit_distance("ab", "ba") == 2


def test_char_accuracy_by_hand():
    labels = np.array(["ab12", "xyz"], dtype="<U16")
    # decoded "ab1" (one deletion) and "xyz": 1 - 1/7
    assert char_accuracy(_scores(["ab1", "xyz"]), labels) == pytest.approx(6 / 7)
    # decoded "b12" (a missing) and "xzz" (y -> z): 1 - 2/7
    assert char_accuracy(_scores(["-b12", "xz-z"]), labels) == pytest.approx(5 / 7)
    assert char_accuracy(_scores(["a-b-1-2", "x-y-z"]), labels) == 1.0
    # far more errors than characters: floored at 0
    assert char_accuracy(_scores(["0-1-2-3-4-5-6-7", "a"]), np.array(["a", "b"], dtype="<U16")) == 0.0


def test_labels_from_an_npz_without_pickle(tmp_path):
    path = tmp_path / "lines.npz"
    np.savez(path, x=np.zeros((2, 1, 32, 160), np.float32), y=np.array(["4ab", "zz9q"], dtype="<U16"))
    with np.load(path, allow_pickle=False) as data:
        assert char_accuracy(_scores(["4ab", "z-z9q"]), data["y"]) == 1.0


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="needs labels"):
        char_accuracy(_scores(["ab"]), None)
    with pytest.raises(ValueError, match="classes per position"):
        greedy_decode(np.zeros((1, 4, 10), np.float32))
    with pytest.raises(ValueError, match=r"\(N, T, C\)"):
        greedy_decode(np.zeros((4, C), np.float32))
    with pytest.raises(ValueError, match="2 outputs but 1 labels"):
        char_accuracy(_scores(["a", "b"]), np.array(["a"]))
