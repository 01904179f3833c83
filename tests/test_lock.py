"""Concurrent runs: a second compress into an --out that another one holds is refused in one line;
the lock dies with its holder (SIGKILL included), so the same command then succeeds."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from hirelc_onnx.lock import LOCK_NAME, OutDirInUseError, hold_out_dir
from tests.graph.test_loader_hostile import save_external, tiny_model

OUTPUTS = ["config.json", "model.onnx", "report.html", "report.json"]

_HOLDER = """
import sys, time
from hirelc_onnx.lock import hold_out_dir
with hold_out_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hirelc_onnx", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture()
def holder(tmp_path):
    """A child process holding tmp_path/out (killed with SIGKILL at the end if still alive)."""
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield child, out
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        child.stdout.close()


def test_second_compress_is_refused_until_the_holder_dies(tmp_path, holder):
    child, out = holder
    model = save_external(tiny_model(), tmp_path / "m" / "tiny.onnx")
    cmd = ("compress", model, "--method", "uniform", "--bits", "4", "--out", out)
    res = _cli(*cmd)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert lines[0] == (f"error: --out {out} is in use by another hirelc-onnx compress (pid {child.pid}); "
                        "wait for it or choose another folder")
    assert not (out / "model.onnx").exists()

    os.kill(child.pid, signal.SIGKILL)  # dies holding the lock: the kernel releases it, no cleanup needed
    child.wait(timeout=30)
    res = _cli(*cmd)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS  # the lock file is not left among the outputs
    res = _cli(*cmd, "--overwrite")  # again into the same folder once the first has ended (it holds that run)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS


def test_lock_is_exclusive_within_a_process_too(tmp_path):
    out = tmp_path / "o"
    with hold_out_dir(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(OutDirInUseError, match=rf"pid {os.getpid()}\)"):
            with hold_out_dir(out):
                pass
    assert not out.exists()  # created for the run and left empty: removed again
    with hold_out_dir(out):  # free again
        (out / "kept").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["kept"]
