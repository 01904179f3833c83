"""Offline data for the text references: rendered lines and docstring sentences."""
from __future__ import annotations

import re

import numpy as np
import pytest

from examples import sentences as st
from examples import text_lines as tl


def test_lines_are_deterministic_images_of_their_strings():
    x, y = tl.render_lines(24, seed=5)
    assert x.shape == (24, 1, tl.LINE_HEIGHT, tl.LINE_WIDTH) and x.dtype == np.float32
    assert y.dtype == np.dtype(tl.LABEL_DTYPE)
    assert all(tl.MIN_CHARS <= len(s) <= tl.MAX_CHARS and set(s) <= set(tl.ALPHABET) for s in y)
    x2, y2 = tl.render_lines(24, seed=5)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(x, tl.render_lines(24, seed=6)[0])
    assert 0.0 <= x.min() and x.max() <= 1.0
    # ink is there and longer strings cover more columns
    ink = (x[:, 0] > x[:, 0].mean(axis=(1, 2), keepdims=True) + 0.25).any(axis=1).sum(axis=1)
    lengths = np.array([len(s) for s in y])
    assert (ink > 0).all() and np.corrcoef(ink, lengths)[0, 1] > 0.5


def test_every_line_font_is_shipped_by_matplotlib():
    for name in tl.LINE_FONTS:
        assert tl.font_path(name).is_file()
    with pytest.raises(FileNotFoundError, match="ships no font"):
        tl.font_path("NoSuchFont.ttf")


def test_lines_npz_loads_without_pickle(tmp_path):
    path = tl.write_lines_npz(tmp_path / "lines.npz", n=6, seed=3)
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"x", "y"}
        np.testing.assert_array_equal(data["y"], tl.render_lines(6, seed=3)[1])
        assert data["y"].dtype == np.dtype("<U16") and data["x"].shape == (6, 1, 32, 160)


def test_docstring_sentences_are_plain_deterministic_and_unique():
    got = st.docstring_sentences(("filelock",))
    assert got == st.docstring_sentences(("filelock",))
    assert len(got) > 50
    assert len({s.lower() for s in got}) == len(got)
    for s in got:
        assert st.MIN_WORDS <= len(s.split()) <= st.MAX_WORDS
        assert s[0].isupper() and s.endswith(".") and not re.search(r"[`=()<>:\[\]{}]", s)


def test_prose_paragraphs_stop_at_sections_and_skip_code():
    doc = "Summary line.\n\nMore words here.\n>>> code()\n\nParameters\n----------\nx : int\n    Not prose."
    assert st._prose_paragraphs(doc) == ["Summary line.", "More words here."]


@pytest.mark.slow
def test_default_corpus_is_large_and_stable():
    corpus = st.sentence_corpus()
    assert len(corpus) >= 2000
    assert st.sentence_corpus(50) == corpus[:50]
    with pytest.raises(ValueError, match="asked for"):
        st.sentence_corpus(len(corpus) + 1)
