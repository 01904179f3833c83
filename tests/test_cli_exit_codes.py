"""`compress`'s exit status for a pipeline: 0 goals met, 3 a goal missed (model still written, the miss
printed first), 2 bad input, 130 interrupted (with a --resume hint only when there is state to resume).

The interrupts come from the run itself at named points (hirelc_onnx/kill_points.py with
HIRELC_TEST_KILL_SIGNAL=INT): a SIGINT, as Ctrl-C sends, landing in the phase the point names.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hirelc_onnx.cli import main
from hirelc_onnx.commands.compress import EXIT_CODES, GOAL_MISSED, goal_line, resume_hint
from hirelc_onnx.kill_points import ENV_VAR, SIGNAL_VAR, default_sigint
from hirelc_onnx.report.outputs import STATE_FILE

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, interrupt_at: str | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, SIGNAL_VAR)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if interrupt_at:
        env.update({ENV_VAR: interrupt_at, SIGNAL_VAR: "INT"})
    # the CLI with HiReLC's agents shrunk (tests/quick_cli.py): the statuses do not depend on their size
    return subprocess.run([sys.executable, "-m", "tests.quick_cli", "compress", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=cwd, preexec_fn=default_sigint)


def test_exit_codes_are_in_the_help():
    res = CliRunner().invoke(main, ["compress", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "Exit status:" in text and all(f"{code} " in text for code in EXIT_CODES)
    assert "[default: (4x for hirelc, 30x for two-stage" in text  # no silent default budget
    assert "resnet" not in text and "MODEL's name + .hirelc in the current folder" in text


@pytest.mark.parametrize("args", [
    ["/no/such/model.onnx", "--method", "uniform"],  # bad input the tool finds
    ["x.onnx", "--bits", "9"],  # click's usage errors: the same status
    ["x.onnx", "--bitz", "4"],
    [],
])
def test_bad_input_is_status_2_in_one_line(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["compress", *args])
    assert res.exit_code == 2, res.output
    assert len([line for line in res.output.splitlines() if line.startswith("error: ")]) == 1, res.output
    assert "Traceback" not in res.output and not list(tmp_path.iterdir())


def test_interrupt_is_130_without_a_resume_hint_when_the_method_cannot_resume(reference_models, tmp_path):
    res = _cli(reference_models("resnet20"), "--method", "random", "--data", "digits", "--budget", "6x",
               "--evaluations", "3", "--finetune-epochs", "1", "--out", tmp_path / "o", interrupt_at="finetune")
    assert res.returncode == 130, res.stderr
    assert res.stderr.strip().splitlines()[-1] == "interrupted", res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()  # the folder it made, empty, is gone


def test_the_resume_hint_names_state_only_where_it_is(tmp_path):
    assert resume_hint("random", tmp_path) == ""  # random cannot resume
    assert resume_hint("hirelc", None) == ""
    assert resume_hint("hirelc", tmp_path) == "; no round had finished, so nothing was saved to resume"
    (tmp_path / STATE_FILE).write_text("{}")
    assert "--resume" in resume_hint("hirelc", tmp_path) and str(tmp_path / STATE_FILE) in resume_hint("hirelc", tmp_path)


def test_goal_line_says_met_missed_or_none_with_the_limits():
    report = {"size": {"ratio": 5.5}, "budget": 6.0, "max_drop": 1.0, "accuracy": {"drop_points": 0.25},
              "goal": {"budget_met": False, "max_drop_met": True}}
    assert goal_line(report) == (False, "goal MISSED: budget 6x NOT reached: 5.50x; a drop of 0.25 points "
                                        "(test split) is within --max-drop 1")
    report["goal"] = {"budget_met": True, "budget_default": True}
    assert goal_line(report) == (True, "goal met: 5.50x reaches the budget 6x (the method's default)")
    assert goal_line({"size": {"ratio": 3.9}, "goal": {"budget_met": None}})[0] is None


@pytest.mark.slow
def test_a_missed_goal_is_3_and_an_interrupted_search_resumes_to_it(reference_models, tmp_path):
    """HiReLC on the VGG digits model, data-free, at --max-drop 0 (12x of 2-4 bit weights drops
    agreement with fp32): interrupted in round 2's RL (130, state saved, the hint names it), resumed,
    it writes its best model and exits 3 with the miss first; the report counts both rounds."""
    model = tmp_path / "vgg.onnx"
    shutil.copy(reference_models("vgg"), model)
    search = ["--budget", "12x", "--max-drop", "0", "--evaluations", "2"]
    res = _cli(model, *search, interrupt_at="rl#2", cwd=tmp_path)
    assert res.returncode == 130, res.stderr
    assert "output folder: vgg.hirelc/ (the default; --out chooses)" in res.stderr
    state = Path("vgg.hirelc") / STATE_FILE
    assert res.stderr.strip().splitlines()[-1] == (f"interrupted; the rounds done are saved in {state}: continue "
                                                   "with the same command plus --resume"), res.stderr
    assert json.loads((tmp_path / state).read_text())["next_round"] == 1
    res = _cli(model, *search, "--resume", cwd=tmp_path)
    assert res.returncode == GOAL_MISSED, res.stderr
    first = res.stdout.strip().splitlines()[0]
    assert first.startswith("goal MISSED: ") and "--max-drop 0 points NOT met: dropped" in first, res.stdout
    out = tmp_path / "vgg.hirelc"
    report = json.loads((out / "report.json").read_text())
    assert report["goal"] == {"budget_met": True, "max_drop_met": False, "sentence": first}  # one wording
    assert report["accuracy"]["evaluations"] == report["search"]["rounds"] == 2  # the round before the resume too
    listed = res.stdout[res.stdout.index("files:"):].split()[1:]
    assert sorted(listed) == sorted(f"vgg.hirelc/{p.name}" for p in out.iterdir() if not p.name.startswith("."))
    assert listed[0] == "vgg.hirelc/model.onnx" and "vgg.hirelc/search_state.json" in listed
