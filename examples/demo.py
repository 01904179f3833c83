"""`make demo`: build the ResNet-20 digits reference model, compress it at 6x, print the table, the
output folder and whether the goal was met.

Run as `python -m examples.demo [--budget 6x] [--method hirelc] [--out demo_out]`. Each run replaces
the previous demo's outputs in --out (`compress --overwrite`). The exit status is compress's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from examples.reference_models import build_reference_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", default="6x")
    parser.add_argument("--method", default="hirelc")
    parser.add_argument("--target", default="storage")
    parser.add_argument("--evaluations", type=int, default=6)
    parser.add_argument("--finetune-seconds", type=float, default=15.0)
    parser.add_argument("--out", default="demo_out")
    args = parser.parse_args(argv)

    from hirelc_onnx.cli import main as cli
    from hirelc_onnx.commands.compress import goal_line
    from hirelc_onnx.errors import UserError
    from hirelc_onnx.search.methods import get_method

    try:
        takes = get_method(args.method).options
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print("building the ResNet-20 digits reference model (cached after the first run) ...", flush=True)
    model = build_reference_model("resnet20")
    print(f"model: {model}\n", flush=True)
    cli.main(["inspect", str(model), "--no-groups"], standalone_mode=False)
    print(f"\ncompressing at --budget {args.budget} with --method {args.method} ...", flush=True)
    command = ["compress", str(model), "--data", "digits", "--method", args.method, "--target", args.target,
               "--out", args.out, "--overwrite"]
    for option, value in (("budget", args.budget), ("evaluations", args.evaluations),
                          ("finetune_seconds", args.finetune_seconds)):
        if option in takes:  # the demo's defaults go only to a method that takes them
            command += ["--" + option.replace("_", "-"), str(value)]
    status = 0
    try:
        cli.main(command)  # standalone: a user error is one line and an exit status, as on the command line
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    out = Path(args.out).resolve()
    if not (out / "report.json").is_file() or status not in (0, 3):  # 3: written, a goal missed
        return status
    print(f"\noutput folder: {out}/  (open {out / 'report.html'})")
    print(goal_line(json.loads((out / "report.json").read_text()))[1])
    print(f"({time.perf_counter() - start:.0f} s in all)")
    return status


if __name__ == "__main__":
    sys.exit(main())
