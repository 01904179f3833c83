"""A small version of `make bench-real`: the recognizer rows are measured, scored and tabled."""
from __future__ import annotations

import json

import pytest

from bench.real_models import main


@pytest.mark.slow
@pytest.mark.xdist_group("text_recognizer")  # one worker builds it in a fresh clone while the other runs on
def test_quick_recognizer_section(tmp_path, reference_models):
    reference_models("text_recognizer")
    assert main(["--quick", "--only", "recognizer", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "real.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["hirelc 6x, --metric char_accuracy", "hirelc 6x, default per-position objective"]
    for r in rows:  # the budget holds on the emitted bytes; the score is the plugin's, on unseen lines
        assert r["ratio"] >= 6.0 - 1e-6 and 0.5 < r["char_accuracy"] <= 1.0
        assert r["drop_points"] == pytest.approx(100 * (r["fp32_char_accuracy"] - r["char_accuracy"]))
    text = (tmp_path / "REAL.md").read_text()
    assert "## CTC text-line recognizer" in text and f"| {rows[0]['char_accuracy']:.4f} |" in text
