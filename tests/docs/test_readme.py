"""The README's "Use from Python" example runs as written and does what it says."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section holds one Python example"
    return blocks[0]


def test_the_python_example_runs(reference_models, tmp_path, monkeypatch, capsys):
    reference_models("resnet20")  # built (or found) in the cache the example reads
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_example(), "README.md: Use from Python", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "loading the model 0/1"
    assert re.fullmatch(r"\d+\.\d\dx smaller, test accuracy 0\.\d{4} \(fp32 0\.\d{4}\)", printed[-1]), printed[-1]
    report = json.loads((tmp_path / "resnet20-int4" / "report.json").read_text())
    assert f"{report['size']['ratio']:.2f}x smaller" in printed[-1]
    assert f"test accuracy {report['accuracy']['compressed']:.4f}" in printed[-1]
