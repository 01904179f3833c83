"""A small version of `make bench-real`: the recognizer rows are measured, scored and tabled."""
from __future__ import annotations

import json

import pytest

from bench.real_models import main


@pytest.mark.slow
@pytest.mark.xdist_group("text_recognizer")  # one worker builds it in a fresh clone while the other runs on
def test_quick_recognizer_section(tmp_path, small_recognizer_in_benches):
    assert main(["--quick", "--only", "recognizer", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "real.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["hirelc 6x, --metric char_accuracy", "hirelc 6x, default per-position objective"]
    for r in rows:  # the budget holds on the emitted bytes; the score is the plugin's, on unseen lines
        assert r["ratio"] >= 6.0 - 1e-6 and 0.5 < r["char_accuracy"] <= 1.0
        assert r["drop_points"] == pytest.approx(100 * (r["fp32_char_accuracy"] - r["char_accuracy"]))
    text = (tmp_path / "REAL.md").read_text()
    assert "## CTC text-line recognizer" in text and f"| {rows[0]['char_accuracy']:.4f} |" in text


def test_a_section_run_alone_keeps_the_others_rows_dates_and_times(tmp_path):
    from bench.real_models import _other_sections, write_results

    meta = {"date": "d1", "versions": {"cpu": "x", "cores": 2, "onnxruntime": "1"}, "settings": {"evaluations": 1,
            "finetune_epochs": 0}, "seconds": 60.0, "sections": ["minilm", "data-free"],
            "section_dates": {"minilm": "d1", "data-free": "d0"}, "section_seconds": {"minilm": 60.0, "data-free": 90.0}}
    rows = [{"section": "minilm", "model": "minilm-l6", "method": "hirelc 6x", "data": "1000 sentences", "ratio": 6.0,
             "seconds": 50.0, "mean_cosine": 0.99, "top10_overlap": 0.91, "n": 1000},
            {"section": "data-free", "model": "minilm-l6", "method": "hirelc 7.5x", "data": "none", "ratio": 7.5,
             "seconds": 80.0, "metric": "mean cosine", "score_on_real_data": 0.95, "vs_uniform": 0.02,
             "ort_loads": True, "n": 1000}]
    missed = {"section": "recognizer", "model": "text-recognizer", "method": "hirelc 6x, --metric char_accuracy",
              "data": "1000 lines", "ratio": 6.01, "seconds": 9.0, "char_accuracy": 0.97, "fp32_char_accuracy": 0.985,
              "drop_points": 1.5, "n": 1000}
    from bench.real_models import acceptance

    assert acceptance([missed]) == [("recognizer, hirelc 6x, --metric char_accuracy: 6.01x, drop 1.50 <= 1 points",
                                     False)]
    write_results(tmp_path, rows, meta)
    text = (tmp_path / "REAL.md").read_text()
    assert "minilm (d1, 1.0 min)" in text and "data-free (d0, 1.5 min)" in text
    assert "| minilm-l6 | hirelc 7.5x | 7.50x | 0.9500 | +0.0200 | mean cosine | 1000 | yes | 80 |" in text
    assert "- holds: MiniLM at 6x: ratio 6.00 >= 6.0, mean cosine 0.9900 >= 0.97, top-10 overlap 0.910 >= 0.90" in text
    assert "- holds: data-free minilm-l6, hirelc 7.5x: ORT loads it" in text
    kept, dates, seconds = _other_sections(tmp_path, ["minilm"])
    assert [r["method"] for r in kept] == ["hirelc 7.5x"] and dates == {"data-free": "d0"}
    assert seconds == {"data-free": 90.0}
