"""`make demo` ends with the output folder and a sentence saying whether the goal was met."""
from __future__ import annotations

from examples.demo import main


def test_demo_prints_the_output_folder_and_the_goal(tmp_path, capsys):
    out = tmp_path / "demo_out"
    args = ["--method", "uniform-l1", "--evaluations", "1", "--finetune-seconds", "0", "--out", str(out)]
    out.mkdir()
    (out / "model.onnx").write_text("an earlier demo's")  # a second demo replaces the first's outputs
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    folder = lines.index(f"output folder: {out}/  (open {out / 'report.html'})")
    assert lines[folder + 1].startswith("goal met: ") and lines[folder + 1].endswith("reaches the budget 6x")
    assert (out / "model.onnx").read_bytes().startswith(b"\x08")  # an ONNX model now (ir_version first)
