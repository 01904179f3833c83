"""The long fuzz campaign (`make fuzz`): every case through the real CLI in a subprocess.

    python -m tests.fuzz.campaign --cases 400 --seed 0 --out bench/fuzz

Writes report.json (every outcome) and report.md (cases per tool and input kind, and the counts
of tracebacks, hangs, modified inputs and malformed errors, all of which should be 0). Exits 1
when any failure was seen.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from tests.fuzz.cases import Case, generate
from tests.fuzz.harness import CALL_LIMIT_S, FAILURES, Outcome, run_subprocess

__all__ = ["run_campaign", "write_report", "main"]


def _run_one(case: Case) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="hirelc-fuzz-") as d:
        return run_subprocess(case, Path(d), CALL_LIMIT_S)


def run_campaign(n: int, seed: int, workers: int = 2, log=print) -> list[Outcome]:
    """Run `n` generated cases, `workers` subprocesses at a time; outcomes in case order."""
    cases = list(generate(n, seed))
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, outcome in enumerate(pool.map(_run_one, cases), 1):
            outcomes.append(outcome)
            flag = "" if outcome.verdict in ("ok", "error") else f"  <-- {outcome.verdict.upper()}"
            log(f"[{i}/{n}] {outcome.verdict:9s} {outcome.seconds:6.1f}s {outcome.case}{flag}")
    return outcomes


def _table(rows: dict[str, Counter], title: str) -> list[str]:
    cols = ["cases", "ok", "error", *FAILURES]
    lines = [f"### {title}", "", "| " + " | ".join([title.split()[-1], *cols]) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for key in sorted(rows):
        c = rows[key]
        lines.append("| " + " | ".join([key, str(sum(c.values()))] + [str(c[v]) for v in cols[1:]]) + " |")
    return lines + [""]


def write_report(outcomes: list[Outcome], out: Path, seed: int, seconds: float) -> dict:
    """report.json and report.md under `out`; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    totals = Counter(o.verdict for o in outcomes)
    by_tool: dict[str, Counter] = defaultdict(Counter)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        by_tool[o.tool][o.verdict] += 1
        by_kind[o.kind][o.verdict] += 1
    summary = {
        "seed": seed, "cases": len(outcomes), "seconds": round(seconds, 1), "call_limit_s": CALL_LIMIT_S,
        "ok": totals["ok"], "error": totals["error"],
        "tracebacks": totals["traceback"] + totals["internal-error"], "hangs": totals["hang"], "modified_inputs": totals["modified"],
        "malformed_errors": totals["bad-error"], "invalid_outputs": totals["bad-output"],
        "slowest_s": max((o.seconds for o in outcomes), default=0.0),
    }
    (out / "report.json").write_text(json.dumps(
        {"summary": summary, "by_tool": by_tool, "by_kind": by_kind, "outcomes": [asdict(o) for o in outcomes]},
        indent=2) + "\n")
    md = [
        "# Fuzz campaign", "",
        f"`python -m tests.fuzz.campaign --cases {len(outcomes)} --seed {seed}`: every case through "
        f"`python -m hirelc_onnx` in a subprocess, {CALL_LIMIT_S:g} s limit per call.", "",
        f"- cases: {len(outcomes)} ({summary['ok']} succeeded with a model ONNX Runtime loads, "
        f"{summary['error']} refused with one `error:` line) in {summary['seconds']} s; slowest call "
        f"{summary['slowest_s']:.1f} s",
        f"- tracebacks (backstop `internal error` lines included): {summary['tracebacks']}", f"- hangs: {summary['hangs']}",
        f"- modified inputs: {summary['modified_inputs']}",
        f"- malformed errors (not exactly one `error:` line): {summary['malformed_errors']}",
        f"- invalid emitted models: {summary['invalid_outputs']}", "",
        *_table(by_tool, "Per tool"), *_table(by_kind, "Per input kind"),
    ]
    bad = [o for o in outcomes if o.verdict in FAILURES]
    if bad:
        md += ["## Failures", ""] + [f"- `{o.case}` {o.verdict}: {o.detail.strip().splitlines()[-1][:200] if o.detail else ''}"
                                     for o in bad] + [""]
    (out / "report.md").write_text("\n".join(md))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/fuzz"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    outcomes = run_campaign(args.cases, args.seed, args.workers)
    summary = write_report(outcomes, args.out, args.seed, time.perf_counter() - t0)
    print(json.dumps(summary))
    failed = sum(summary[k] for k in ("tracebacks", "hangs", "modified_inputs", "malformed_errors", "invalid_outputs"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
