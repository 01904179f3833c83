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


def _short(name: str, width: int = 28) -> str:
    """A kernel name cut from the left to fit under a bar (the end names the layer)."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _plots(report: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = []
    acc = report.get("accuracy") or {}
    hist = [h for h in report.get("history", []) if h.get("score") is not None and h.get("ratio")]
    if hist:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for kind, marker in (("proxy", "."), ("real", "o")):
            pts = [(h["ratio"], h["score"]) for h in hist if h.get("kind", "real") == kind]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, alpha=0.6, label=f"{kind} evaluations (validation)")
        front = pareto_front([(h["ratio"], h["score"]) for h in hist if h.get("kind", "real") == "real"])
        if front:
            ax.plot(*zip(*front), "k--x", label="Pareto front of real evaluations (validation)")
        for name, base in report.get("baselines", {}).items():
            ax.scatter([base["ratio"]], [base["score"]], marker="s", label=f"{name} (validation)")
        ratio = report["size"]["ratio"]
        if acc.get("val_compressed") is not None:
            ax.scatter([ratio], [acc["val_compressed"]], marker="*", s=220, color="tab:red", zorder=5,
                       label=f"emitted model (validation) {ratio:.2f}x")
        if acc.get("compressed") is not None:
            ax.scatter([ratio], [acc["compressed"]], marker="P", s=120, color="tab:purple", zorder=5,
                       label="emitted model (test, held out)")
        if acc.get("fp32_val") is not None:
            ax.axhline(acc["fp32_val"], color="grey", lw=0.8, label="fp32 (validation)")
        if report.get("budget"):
            ax.axvline(report["budget"], color="tab:green", ls=":", label=f"budget {report['budget']:g}x")
        ax.set_xlabel("compression ratio (fp32 weight bytes / true stored bytes)")
        ax.set_ylabel(f"{acc.get('metric', 'score')} on the validation split")
        ax.legend(fontsize=7)
        out.append(("Candidates: size vs score (validation split; the emitted model also on test)", _png(fig)))
        real = [h for h in hist if h.get("kind", "real") == "real"]
        if real:
            fig, ax = plt.subplots(figsize=(6, 3))
            xs = range(1, len(real) + 1)
            ax.plot(xs, [h["score"] for h in real], "o-", label="score (validation)")
            ax.plot(xs, [max(h["score"] for h in real[: i + 1]) for i in range(len(real))], "k-", label="best so far")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("real evaluation (number)")
            ax.set_ylabel(f"{acc.get('metric', 'score')} on the validation split")
            ax.legend(fontsize=7)
            out.append(("Search curve", _png(fig)))
    rows = [r for r in report.get("kernels", []) if "bits" in r]
    if rows:
        out.append(("Bits and keep ratio per kernel", _png(_bits_plot(plt, rows))))
    sens = (report.get("sensitivity") or {}).get("per_kernel")
    if sens:
        names = [r["kernel"] for r in report.get("kernels", []) if r["kernel"] in sens] or list(sens)
        fig, ax = plt.subplots(figsize=(min(40, max(6, len(names) * 0.25)), 3.6))
        ax.bar(range(len(names)), [sens[n] for n in names], color="tab:orange")
        ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=6)
        ax.set_ylabel("share of the total")
        ax.set_title(f"source: {report['sensitivity'].get('source')}", fontsize=8)
        out.append(("Sensitivity per kernel (shares of the total, as `inspect --sensitivity`)", _png(fig)))
    return out


_FP32_AT = 10  # where an fp32 kernel's bar ends on the bits axis, labelled "fp32"


def _bits_plot(plt, rows: list[dict]):
    """Bits per kernel (fp32 drawn as its own labelled bar, not as a bit count) and keep ratio, kernels named."""
    fig, ax1 = plt.subplots(figsize=(min(40, max(6, len(rows) * 0.25)), 3.8))
    xs = range(len(rows))
    fp32 = [r["bits"] >= 32 for r in rows]
    ax1.bar(xs, [_FP32_AT if f else r["bits"] for r, f in zip(rows, fp32)],
            color=["lightgrey" if f else "tab:blue" for f in fp32], hatch=None, alpha=0.8)
    ax1.set_yticks([2, 3, 4, 5, 6, 7, 8, _FP32_AT], ["2", "3", "4", "5", "6", "7", "8", "fp32"])
    ax1.set_ylabel("weight bits (grey: left fp32)")
    ax1.set_xticks(list(xs), [_short(r["kernel"]) for r in rows], rotation=90, fontsize=6)
    ax2 = ax1.twinx()
    ax2.plot(list(xs), [r["keep_ratio"] for r in rows], "r.-")
    ax2.set_ylabel("keep ratio (channels kept)", color="r")
    ax2.set_ylim(0, 1.05)
    return fig


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
        if isinstance(v, dict) and "speedup" in v:
            summary.append({"figure": f"latency {key} fp32 / compressed (median ms)",
                            "value": f"{v['fp32_ms']:.3f} / {v['compressed_ms']:.3f} ({fmt_speed(v['speedup'])})"
                                     + (", IQR of per-round ratios {:.2f}-{:.2f}".format(*v["speedup_iqr"])
                                        if v.get("speedup_iqr") else "")})
    if report.get("latency_note"):
        notes.append(f"latency: {report['latency_note']}")
    outputs = (acc or {}).get("outputs") or []
    cols_out = ["name", "kind"] + sorted({k for o in outputs for k in o} - {"name", "kind", "shape"})
    outputs_html = (f"<h2>Outputs (test split, each against fp32)</h2>{_table(outputs, cols_out)}" if outputs else "")
    plots = "".join(f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{b}'/>" for t, b in _plots(report))
    cols = ["kernel", "op", "block", "shape", "shape_after", "bits", "keep_ratio", "qtype", "granularity",
            "bytes_before", "bytes_after"]
    kernels = [{**r, "bits": "fp32" if r.get("bits", 0) >= 32 else r.get("bits", "")} for r in report.get("kernels", [])]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>hirelc-onnx report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}</style></head><body>
<h1>hirelc-onnx: {html.escape(report['method'])} on {html.escape(report['input']['path'])}</h1>
<p class="goal"><b>{html.escape((report.get('goal') or {}).get('sentence') or '')}</b></p>
<p>target <b>{html.escape(report['target'])}</b>; scores: the emitted model on the held-out test split, candidates
on the validation split</p>
{_table(summary, ['figure', 'value'])}
{outputs_html}
{"".join(f"<p><b>{html.escape(str(n))}</b></p>" for n in notes)}
{plots}
<h2>Per kernel (shape before and after pruning; bytes as stored)</h2>{_table(kernels, cols)}
{_per_node_section(report.get('per_node') or {})}
<p>{html.escape(str(report.get('versions')))}</p></body></html>"""
