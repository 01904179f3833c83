"""One split, one unit, one wording: `evaluate` on a compress output gives the report's test figure, and
sizes and speed read the same in the compress summary, benchmark, report.json and report.html."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from hirelc_onnx.cli import main
from hirelc_onnx.commands.compress import print_summary
from hirelc_onnx.compress import compress
from hirelc_onnx.units import fmt_bytes, fmt_speed


def test_units():
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(179_709) == "179,709 B (175.5 KiB)"
    assert fmt_bytes(3 * 2**20) == "3,145,728 B (3.0 MiB)"
    assert fmt_bytes(3 * 2**20, exact=False) == "3.0 MiB"
    assert fmt_speed(1.1234) == "1.12x faster"
    assert fmt_speed(1 / 4.41) == "4.41x slower"
    assert fmt_speed(1.0) == "1.00x faster"


@pytest.fixture(scope="module")
def run(reference_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wording")
    model = folder / "resnet20.onnx"
    shutil.copy(reference_models("resnet20"), model)
    result = compress(model, data="digits", method="uniform", bits=4, finetune_epochs=0, seed=3, latency_runs=2,
                      out_dir=folder / "out")
    return model, folder / "out", result.report


def _evaluate(*args):
    res = CliRunner().invoke(main, ["evaluate", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_evaluate_on_a_compress_output_uses_its_test_split(run):
    model, out, report = run
    acc = report["accuracy"]
    for target in (out, out / "model.onnx"):  # the folder, or its model with report.json beside it
        got = _evaluate(target)
        assert (got["data"], got["split"], got["seed"]) == ("digits", "test", 3)
        assert got["n"] == acc["n"] and got["accuracy"] == pytest.approx(acc["compressed"], abs=1e-12)
    assert _evaluate(out, "--split", "val")["split"] == "val"  # asked for: another split of that run
    plain = _evaluate(model, "--data", "digits")  # not a compress output: the whole data, as before
    assert plain["split"] == "all" and plain["n"] == 1797
    res = CliRunner().invoke(main, ["evaluate", str(model)])
    assert res.exit_code == 2 and "give --data" in res.output


def test_speed_and_sizes_read_one_way_everywhere(run, capsys):
    _, out, report = run
    latency = report["latency"]["batch1"]
    words = fmt_speed(latency["speedup"])
    assert latency["speed"] == words
    assert f"({words})" in (out / "report.html").read_text()
    assert fmt_bytes(report["size"]["file_bytes"]) in (out / "report.html").read_text()
    print_summary(report, out)
    summary = capsys.readouterr().out
    assert words in summary and fmt_bytes(report["size"]["weight_bytes"]) in summary
    bench = CliRunner().invoke(main, ["benchmark", str(out), "--against", str(run[0]), "--runs", "2", "--warmup", "0",
                                      "--no-memory"], env={"COLUMNS": "250"})
    assert bench.exit_code == 0, bench.output
    assert ("x faster" in bench.stdout or "x slower" in bench.stdout) and fmt_bytes(report["size"]["file_bytes"]) in bench.stdout
