"""Run one fuzz Case through the CLI and judge it: one `error:` line, or success with a valid model.

In-process (click's CliRunner, fast) for the quick suite; in a subprocess with a wall-clock limit
for hang cases and the campaign. Either way the input files are hashed before and after.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.cases import Case

__all__ = ["Outcome", "run_in_process", "run_subprocess", "CALL_LIMIT_S", "HANG_PLUGIN_TIMEOUT_S", "FAILURES"]

CALL_LIMIT_S = 60.0  # the stated limit: no call may run longer
HANG_PLUGIN_TIMEOUT_S = "4"  # HIRELC_PLUGIN_TIMEOUT for fuzz runs: a hung plugin must be cut off by the product
FAILURES = ("traceback", "internal-error", "bad-error", "hang", "modified", "bad-output")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Outcome:
    """verdict: 'ok' (exit 0, valid output), 'error' (one error: line) or one of FAILURES.

    An `error: internal error:` line (the CLI's backstop) is a failure: it stands for a traceback."""

    case: str
    tool: str
    kind: str
    verdict: str
    exit_code: int | None
    seconds: float
    detail: str = ""


def _hashes(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _judge(case: Case, root: Path, code: int | None, stderr: str, before: dict[str, str], inputs: list[Path],
           seconds: float, crashed: str = "") -> Outcome:
    def out(verdict: str, detail: str = "") -> Outcome:
        return Outcome(case.id, case.tool, case.kind, verdict, code, round(seconds, 3), detail)

    if _hashes([p for p in inputs if p.exists()]) != before or not all(p.exists() for p in inputs):
        return out("modified", "an input file changed")
    if crashed or "Traceback" in stderr:
        return out("traceback", crashed or stderr[-2000:])
    if code == 0:
        if case.tool == "compress":
            emitted = root / "out" / "model.onnx"
            try:
                import onnxruntime as ort

                ort.InferenceSession(str(emitted), providers=["CPUExecutionProvider"])
            except Exception as exc:
                return out("bad-output", f"{emitted}: {type(exc).__name__}: {exc}"[:500])
        return out("ok")
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    if len(errors) != 1:
        return out("bad-error", stderr[-2000:] or "(no stderr)")
    if errors[0].startswith("error: internal error:"):  # the CLI's backstop caught a bug: a crash all the same
        return out("internal-error", errors[0][:300])
    return out("error", errors[0][:300])


def run_in_process(case: Case, root: Path) -> Outcome:
    """Invoke the CLI's `main` in this process with CliRunner; only SystemExit may leave it."""
    from click.testing import CliRunner

    from hirelc_onnx.cli import main

    inputs = case.write(root)
    before = _hashes(inputs)
    sys.path.insert(0, str(root))  # plugin modules live in the case folder
    old_env = os.environ.get("HIRELC_PLUGIN_TIMEOUT")
    os.environ["HIRELC_PLUGIN_TIMEOUT"] = HANG_PLUGIN_TIMEOUT_S
    t0 = time.perf_counter()
    try:
        result = CliRunner().invoke(main, case.argv(root), catch_exceptions=True)
    finally:
        sys.path.remove(str(root))
        if old_env is None:
            os.environ.pop("HIRELC_PLUGIN_TIMEOUT", None)
        else:
            os.environ["HIRELC_PLUGIN_TIMEOUT"] = old_env
    seconds = time.perf_counter() - t0
    crashed = ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        crashed = "".join(traceback.format_exception(*result.exc_info))[-2000:]
    return _judge(case, root, result.exit_code, result.stderr, before, inputs, seconds, crashed)


def run_subprocess(case: Case, root: Path, limit_s: float = CALL_LIMIT_S) -> Outcome:
    """`python -m hirelc_onnx ...` in a child process, killed after `limit_s` (a hang)."""
    inputs = case.write(root)
    before = _hashes(inputs)
    env = dict(os.environ, HIRELC_PLUGIN_TIMEOUT=HANG_PLUGIN_TIMEOUT_S,
               PYTHONPATH=os.pathsep.join([str(root), str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "hirelc_onnx", *case.argv(root)], capture_output=True,
                              text=True, timeout=limit_s, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return Outcome(case.id, case.tool, case.kind, "hang", None, round(time.perf_counter() - t0, 3),
                       f"no exit within {limit_s:g} s")
    return _judge(case, root, proc.returncode, proc.stderr, before, inputs, time.perf_counter() - t0)
