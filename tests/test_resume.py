"""Kill and resume: a HiReLC search killed with SIGKILL during RL, during fine-tuning and while writing
its outputs, and resumed each time with --resume, emits the very bytes the uninterrupted run emits; no
output in --out is ever half-written; the lock a killed run held does not block the resume.

The kills come from the process itself at named points (hirelc_onnx/kill_points.py, HIRELC_TEST_KILL_AT),
so each lands in the phase it names however fast the machine is.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from hirelc_onnx.io import write_atomic
from hirelc_onnx.kill_points import ENV_VAR
from hirelc_onnx.lock import LOCK_NAME, hold_out_dir

REPO = Path(__file__).resolve().parents[1]
# the command, with 3 rounds (enough for a kill in a round's RL, one in a later round's fine-tune,
# and one after the last round) on the digits reference with the cheapest RL (VGG: 2 blocks)
SEARCH = ("--budget", "6x", "--data", "digits", "--finetune-epochs", "1", "--evaluations", "3", "--seed", "5")
STATE = "search_state.json"
KILLED = -signal.SIGKILL


def _env(kill_at: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if kill_at is not None:
        env[ENV_VAR] = kill_at
    return env


def _run(argv: list[str], kill_at: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          env=_env(kill_at), cwd=REPO)


def _compress_argv(model: Path, out: Path, *extra: str) -> list[str]:
    # the CLI with HiReLC's agents shrunk (tests/quick_cli.py): the replay does not depend on their size
    return ["-m", "tests.quick_cli", "compress", str(model), *SEARCH, "--out", str(out), "--json", *extra]


def _compress(model: Path, out: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return _run(_compress_argv(model, out, *extra), kill_at)


def _assert_nothing_half_written(out: Path) -> dict:
    """Every file a reader may open is whole; returns the search state (whose companions must exist)."""
    for path in out.iterdir():
        if path.name.startswith("."):  # the lock, and temporaries a killed writer left (never read)
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".onnx":
            onnx.checker.check_model(onnx.load(str(path)))
        elif path.suffix == ".html":
            assert path.read_text().rstrip().endswith("</html>"), path
    state = json.loads((out / STATE).read_text())
    for name in (state["best_model"]["path"], state["agents"]):
        assert (out / name).is_file(), name
    return state


def _replayed(state: dict) -> dict:
    """What a search state holds that does not depend on the clock."""
    measured = [{k: m[k] for k in ("round", "key", "score", "source", "predicted", "config")}
                for m in state["measurements"]]
    return {"measurements": measured, **{k: state[k] for k in ("next_round", "probes", "proxies", "current", "levels",
                                                              "estimator", "finetune_lr", "sensitivity")}}


@pytest.mark.slow
def test_killed_searches_resume_to_the_uninterrupted_model(reference_models, tmp_path):
    model = reference_models("vgg")
    # the uninterrupted run, alongside the killed ones (independent: the wall time of the longer)
    with (tmp_path / "whole.log").open("w") as log:
        whole = subprocess.Popen([sys.executable, *_compress_argv(model, tmp_path / "whole")], stdout=log,
                                 stderr=subprocess.STDOUT, env=_env(None), cwd=REPO)
    try:
        _kill_and_resume(model, tmp_path / "killed")
        assert whole.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    finally:
        if whole.poll() is None:
            whole.kill()
            whole.wait()
    out = tmp_path / "killed"
    assert (out / "model.onnx").read_bytes() == (tmp_path / "whole" / "model.onnx").read_bytes()
    assert (out / "config.json").read_bytes() == (tmp_path / "whole" / "config.json").read_bytes()
    # not only the winner: every round measured the same config with the same outcome, and the search
    # ended in the same memory (the emitted model may come from a round before the first kill)
    assert _replayed(json.loads((out / STATE).read_text())) == _replayed(
        json.loads((tmp_path / "whole" / STATE).read_text()))


def _kill_and_resume(model: Path, out: Path) -> None:
    """Kill a search three times, resuming after each kill, and check --out after every step."""
    # 1. during the second round's RL: round 1 is saved, round 2 is lost
    res = _compress(model, out, kill_at="rl#2")
    assert res.returncode == KILLED, res.stderr
    assert _assert_nothing_half_written(out)["next_round"] == 1
    assert (out / LOCK_NAME).exists()  # left behind by the dead holder; its lock died with it
    assert not (out / "model.onnx").exists()
    # 2. resumed, then killed in the fine-tune of the round after the one it replays
    res = _compress(model, out, "--resume", kill_at="finetune#2")
    assert res.returncode == KILLED, res.stderr
    assert _assert_nothing_half_written(out)["next_round"] == 2
    # 3. resumed, finishes the search, killed halfway through writing model.onnx
    res = _compress(model, out, "--resume", kill_at="write:model.onnx")
    assert res.returncode == KILLED, res.stderr
    assert _assert_nothing_half_written(out)["next_round"] == 3
    assert not (out / "model.onnx").exists()
    assert [p.name for p in out.glob(".model.onnx.*.tmp")]  # the half-written copy, never renamed into place
    # 4. resumed: nothing left to search; the outputs are written
    res = _compress(model, out, "--resume")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(res.stdout)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # swept by the resume
    _assert_nothing_half_written(out)


def test_a_write_killed_halfway_leaves_the_old_file_and_a_temporary_the_next_holder_removes(tmp_path):
    out = tmp_path / "out"
    target = out / "model.onnx"
    write_atomic(target, b"old")
    script = f"from hirelc_onnx.io import write_atomic; write_atomic({str(target)!r}, bytes(1000))"
    res = _run(["-c", script], kill_at="write:model.onnx", timeout=60)
    assert res.returncode == KILLED, res.stderr
    assert target.read_bytes() == b"old"
    (temporary,) = out.glob(".model.onnx.*.tmp")
    assert temporary.stat().st_size == 500  # killed halfway, as the point says
    (out / "notes.tmp").write_text("a user's file")  # not a temporary of ours: stays
    with hold_out_dir(out):
        assert not temporary.exists()
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "notes.tmp"]


def test_kill_points_are_inert_unless_named(tmp_path):
    target = tmp_path / "x.bin"
    script = (f"from hirelc_onnx.io import write_atomic; write_atomic({str(target)!r}, b'abc'); "
              "from hirelc_onnx.kill_points import kill_point; kill_point('rl'); kill_point('finetune')")
    res = _run(["-c", script], kill_at="finetune#2", timeout=60)
    assert res.returncode == 0, res.stderr
    assert target.read_bytes() == b"abc"
