"""The quick fuzz suite (runs in `make test`): every mutation of tests/fuzz/cases.py once, fixed seed.

Each case goes through the CLI in-process (CliRunner); the plugin that hangs goes through a real
subprocess, where the product's own plugin time bound must end it. The verdict is one `error:`
line or success with a model ONNX Runtime loads; never a traceback, a hang or a changed input.
The long campaign is `make fuzz` (tests/fuzz/campaign.py).
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from tests.fuzz.cases import quick_cases
from tests.fuzz.harness import CALL_LIMIT_S, run_in_process, run_subprocess

CASES = quick_cases(seed=0)


def test_quick_cases_cover_every_mutation():
    kinds = {c.kind for c in CASES}
    assert {"onnx:truncated", "onnx:byte-flips", "onnx:wrong-dtype", "onnx:dims-disagree", "onnx:dangling-input",
            "onnx:duplicate-names", "onnx:cycle", "onnx:unknown-domain", "onnx:absurd-dims", "onnx:opset",
            "data:npz-pickled", "data:images-zero-byte", "data:plugin-raises", "data:plugin-hangs"} <= kinds
    assert {c.tool for c in CASES} == {"inspect", "compress", "evaluate"}
    assert 30 <= len(CASES) <= 50


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzz_case(case, tmp_path):
    outcome = run_subprocess(case, tmp_path, CALL_LIMIT_S) if case.hang else run_in_process(case, tmp_path)
    assert outcome.verdict in ("ok", "error"), f"{outcome.verdict}: {outcome.detail}"
    if case.hang:
        assert outcome.verdict == "error" and "did not return within" in outcome.detail
    if case.kind in ("onnx:truncated", "onnx:cycle", "onnx:dangling-input", "data:npz-pickled", "data:plugin-raises"):
        assert outcome.verdict == "error"


def test_unexpected_exception_is_one_line(monkeypatch):
    """The CLI's backstop: a bug that escapes as a plain exception is still one `error:` line."""
    from hirelc_onnx.cli import main
    from hirelc_onnx.commands import inspect as inspect_cmd

    def boom(path, **_):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(inspect_cmd, "load_model", boom)
    result = CliRunner().invoke(main, ["inspect", "whatever.onnx"])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: internal error: ZeroDivisionError: simulated bug")
    assert "run with -v for the traceback" in lines[0] and "Traceback" not in result.stderr
    verbose = CliRunner().invoke(main, ["-v", "inspect", "whatever.onnx"])
    assert "Traceback" in verbose.stderr and verbose.exit_code == 1
