"""report.html: the report as a self-contained page with plots (PNG embedded as base64)."""
from __future__ import annotations

import base64
import html
import io

from hirelc_onnx.units import fmt_bytes, fmt_speed

__all__ = ["render_html", "pareto_front"]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (ratio, score) not dominated by another with higher ratio and higher score."""
    front, best = [], float("-inf")
    for ratio, score in sorted(points, key=lambda p: (-p[0], -p[1])):
        if score > best:
            front.append((ratio, score))
            best = score
    return sorted(front)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    hist = [h for h in report.get("history", []) if h.get("score") is not None and h.get("ratio")]
    if hist:
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, marker in (("proxy", "."), ("real", "o")):
            pts = [(h["ratio"], h["score"]) for h in hist if h.get("kind", "real") == kind]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, alpha=0.6, label=f"{kind} evaluations")
        front = pareto_front([(h["ratio"], h["score"]) for h in hist if h.get("kind", "real") == "real"])
        if front:
            ax.plot(*zip(*front), "k--x", label="Pareto front (real)")
        for name, base in report.get("baselines", {}).items():
            ax.scatter([base["ratio"]], [base["score"]], marker="s", label=name)
        if report.get("accuracy"):
            ax.axhline(report["accuracy"]["fp32_val"], color="grey", lw=0.8, label="fp32 (val)")
        ax.set_xlabel("compression ratio (true bytes)")
        ax.set_ylabel("validation score")
        ax.legend(fontsize=7)
        out.append(("Candidates: size vs accuracy", _png(fig)))
        fig, ax = plt.subplots(figsize=(6, 3))
        real = [h for h in hist if h.get("kind", "real") == "real"]
        ax.plot(range(len(real)), [h["score"] for h in real], "o-", label="score")
        ax.plot(range(len(real)), [max(h["score"] for h in real[: i + 1]) for i in range(len(real))], "k-",
                label="best so far")
        ax.set_xlabel("real evaluation")
        ax.set_ylabel("validation score")
        ax.legend(fontsize=7)
        out.append(("Search curve", _png(fig)))
    rows = [r for r in report.get("kernels", []) if "bits" in r]
    if rows:
        fig, ax1 = plt.subplots(figsize=(max(6, len(rows) * 0.18), 3))
        xs = range(len(rows))
        ax1.bar(xs, [r["bits"] if r["bits"] < 32 else 16 for r in rows], color="tab:blue", alpha=0.7)
        ax1.set_ylabel("bits (fp32 drawn as 16)")
        ax2 = ax1.twinx()
        ax2.plot(xs, [r["keep_ratio"] for r in rows], "r.-")
        ax2.set_ylabel("keep ratio", color="r")
        ax2.set_ylim(0, 1.05)
        ax1.set_xlabel("kernel (topological order)")
        out.append(("Bits and keep ratio per layer", _png(fig)))
    sens = report.get("search", {}).get("block_sensitivity")
    if sens:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(range(len(sens)), list(sens.values()))
        ax.set_xlabel("block")
        ax.set_ylabel("Fisher sensitivity (normalised)")
        out.append(("Sensitivity per block", _png(fig)))
    return out


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "x".join(map(str, v))
    return str(v)


def _per_node_section(per_node: dict) -> str:
    """What ONNX Runtime ran for each compressed kernel (see evaluate/per_node.py)."""
    if "error" in per_node:
        return f"<h2>What ONNX Runtime ran</h2><p>not measured: {html.escape(per_node['error'])}</p>"
    if not per_node.get("rows"):
        return ""
    cols = ["kernel", "op_type", "executed", "ms", "fp32_ms", "snr_db", "slower_than_fp32", "note"]
    return (f"<h2>What ONNX Runtime ran, per compressed kernel</h2><p>median kernel time from ORT's profile; "
            f"SNR (dB) of the kernel's output against fp32 on {html.escape(per_node['input'])}</p>"
            + _table(per_node["rows"], cols))


def render_html(report: dict) -> str:
    """A standalone HTML page for `report` (the dict written to report.json)."""
    size, acc, lat = report["size"], report.get("accuracy"), report.get("latency", {})
    summary = [{"figure": "true-bytes ratio", "value": size["ratio"]},
               {"figure": "file ratio", "value": size["file_ratio"]},
               {"figure": "file size", "value": fmt_bytes(size["file_bytes"])}]
    if acc:
        summary += [{"figure": f"{acc['metric']} fp32 (test)", "value": acc["fp32"]},
                    {"figure": f"{acc['metric']} compressed (test)", "value": acc["compressed"]},
                    {"figure": "drop (points)", "value": acc["drop_points"]},
                    {"figure": "test samples the score rests on", "value": acc.get("n")}]
    notes = [n for n in ((acc or {}).get("sample_warning"), (acc or {}).get("data_free_note")) if n]
    data = report.get("data") or {}
    if data.get("preprocessing"):
        notes.append(f"data: {data.get('source') or 'synthesised'}; preprocessing {data['preprocessing']}")
    for key, v in lat.items():
        if "speedup" in v:
            summary.append({"figure": f"latency {key} fp32 / compressed (ms)",
                            "value": f"{v['fp32_ms']:.3f} / {v['compressed_ms']:.3f} ({fmt_speed(v['speedup'])})"})
    outputs = (acc or {}).get("outputs") or []
    cols_out = ["name", "kind"] + sorted({k for o in outputs for k in o} - {"name", "kind", "shape"})
    outputs_html = (f"<h2>Outputs (test split, each against fp32)</h2>{_table(outputs, cols_out)}" if outputs else "")
    plots = "".join(f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{b}'/>" for t, b in _plots(report))
    cols = ["kernel", "op", "block", "shape", "shape_after", "bits", "keep_ratio", "qtype", "granularity",
            "bytes_before", "bytes_after"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>hirelc-onnx report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}</style></head><body>
<h1>hirelc-onnx: {html.escape(report['method'])} on {html.escape(report['input']['path'])}</h1>
<p>target <b>{html.escape(report['target'])}</b>, budget {report.get('budget')}, goal {html.escape(str(report.get('goal')))}</p>
{_table(summary, ['figure', 'value'])}
{outputs_html}
{"".join(f"<p><b>{html.escape(str(n))}</b></p>" for n in notes)}
{plots}
<h2>Per kernel</h2>{_table(report.get('kernels', []), cols)}
{_per_node_section(report.get('per_node') or {})}
<p>{html.escape(str(report.get('versions')))}</p></body></html>"""
