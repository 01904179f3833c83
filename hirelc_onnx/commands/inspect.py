"""`hirelc-onnx inspect`: what the tool sees in a model, and, for a compressed one, what its file holds.

A compressed file is read twice over: as stored (`graph/stored.py`: each kernel's encoding and true
bytes, the opset and element types the file needs; `evaluate/runtimes.py`: which runtimes load it)
and as the BlockGraph sees it once its decodes are folded (shapes, MACs, groups).
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.loaders import check_fits, graph_inputs, load_data
from hirelc_onnx.evaluate.runtimes import runtime_support
from hirelc_onnx.graph import build_block_graph, load_model
from hirelc_onnx.graph.stored import StoredModel, stored_model
from hirelc_onnx.units import fmt_bytes

__all__ = ["inspect", "describe"]


def describe(bg, stored: StoredModel | None = None) -> dict:
    """A JSON-ready description of a BlockGraph: kernels, blocks, groups, totals.

    stored: the file as written (`stored_model` of the model before normalisation). For a compressed
    file, "bytes" and "weight_bytes" are the true stored bytes, "decoded_bytes" the fp32 weights the
    decodes yield, and each kernel says how it is stored ("stored"); the file's needs go in "file".
    """
    info = {
        "opset": bg.opset,
        "inputs": bg.input_shapes,
        "outputs": bg.output_names,
        "totals": {
            "kernels": len(bg.kernels), "kernel_params": bg.total_params, "macs": bg.total_macs,
            "weight_bytes": bg.weight_bytes, "blocks": len(bg.blocks), "channel_groups": len(bg.groups),
            "prunable_groups": len(bg.prunable_groups()),
            "prunable_channels": sum(g.length for g in bg.prunable_groups()),
        },
        "blocks": [{"id": b.id, "name": b.name, "kind": b.kind, "kernels": list(b.kernels)} for b in bg.blocks],
        "kernels": [
            {"name": k.name, "op": k.op, "block": k.block, "weight": k.weight, "shape": list(k.weight_shape),
             "params": k.params, "macs": k.macs, "bytes": bg.initializer_bytes[k.weight],
             "group": k.group, "input_groups": list(k.input_groups),
             "prunable": bg.prunable_kernel(k.name)}
            for k in bg.kernel_list()
        ],
        "groups": [
            {"id": g.id, "channels": g.length, "producers": list(g.producers), "tensors": len(g.tensors),
             "prunable": g.prunable, "refusal": g.refusal}
            for g in bg.groups
        ],
    }
    if stored is not None and stored.compressed:
        _add_stored(info, bg, stored)
    return info


def _add_stored(info: dict, bg, stored: StoredModel) -> None:
    """Stored bytes and encodings in place of the decoded fp32 figures (a compressed file)."""
    by_node = {k.node: k for k in stored.kernels}
    by_weight = {k.weight: k for k in stored.kernels}
    for row in info["kernels"]:
        kernel = by_node.get(row["name"]) or by_weight.get(row["weight"])
        row["decoded_bytes"] = row["bytes"]
        if kernel is not None:
            row["bytes"] = kernel.bytes
            row["stored"] = {k: v for k, v in kernel.as_dict().items() if k not in ("node", "op", "weight")}
    info["totals"]["decoded_weight_bytes"] = info["totals"]["weight_bytes"]
    info["totals"]["weight_bytes"] = stored.weight_bytes
    info["totals"]["ratio_to_decoded"] = bg.weight_bytes / max(stored.weight_bytes, 1)
    info["file"] = {k: v for k, v in stored.as_dict().items() if k != "kernels"}


def _sensitivity(bg, data: str, samples: int, seed: int) -> dict:
    """Fisher sensitivity of every kernel (shares summing to 1) and block, as JSON-ready data."""
    from hirelc_onnx.bridge import fisher_sensitivity  # imports torch: only when --sensitivity asks

    specs = graph_inputs(bg.model)
    ds = check_fits(load_data(data, input_shape=tuple(specs[0].shape) if len(specs) == 1 else None), specs)
    res = fisher_sensitivity(bg, ds, n_samples=samples, seed=seed)
    return {"loss": res.loss, "n_samples": res.n_samples, "per_kernel": res.per_kernel,
            "per_block": {str(b): v for b, v in res.per_block.items()}}


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}P"


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
@click.option("--groups/--no-groups", default=True, help="Show the channel-group table.")
@click.option("--sensitivity", is_flag=True, help="Add Fisher sensitivity per kernel and block (needs --data).")
@click.option("--data", help="Data for --sensitivity: .npz, image folder, 'digits' or package.module:func.")
@click.option("--samples", type=int, default=256, show_default=True, help="Samples for the Fisher estimate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--runtimes/--no-runtimes", default=True, show_default=True,
              help="For a compressed model: try loading it in ONNX Runtime (and OpenVINO, when installed).")
def inspect(model: Path, as_json: bool, groups: bool, sensitivity: bool, data: str | None, samples: int,
            seed: int, runtimes: bool) -> None:
    """Show the blocks, kernels, parameters, MACs, bytes and channel groups of MODEL.

    For a compressed model also: its true stored bytes, each kernel's encoding (bits, grid, int4 /
    2-bit packed / sparse / fp32), the opset and element types the file needs, and which runtimes
    load it."""
    if sensitivity and not data:
        raise UserError("--sensitivity needs --data (the Fisher information is an expectation over inputs)")
    raw = load_model(model, weights=sensitivity)  # the tables need shapes only: big weights stay on disk
    stored = stored_model(raw)  # the file as written, before normalisation folds its decodes
    bg = build_block_graph(raw, inplace=True)
    del raw
    info = describe(bg, stored)
    if stored.compressed:
        info["file"]["file_bytes"] = model.stat().st_size
        if runtimes:
            info["runtimes"] = runtime_support(model, stored.element_types)
    if sensitivity:
        info["sensitivity"] = _sensitivity(bg, data, samples, seed)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 160)
    t = info["totals"]
    console.print(f"[bold]{model}[/]  opset {info['opset']}  inputs {info['inputs']}")
    compressed = "file" in info
    weights = f"{fmt_bytes(t['weight_bytes'])} of weights" + (" as stored" if compressed else "")
    console.print(f"{t['kernels']} kernels in {t['blocks']} blocks, {_human(t['kernel_params'])} kernel params, "
                  f"{_human(t['macs'])} MACs/sample, {weights}; "
                  f"{t['prunable_groups']}/{t['channel_groups']} channel groups prunable", highlight=False)
    if compressed:
        _print_file(console, info)
    table = Table(title="Kernels" + (" (bytes: as stored in the file)" if compressed else ""), show_lines=False)
    cols = ["block", "kernel", "op", "weight shape", "params", "MACs", "bytes"]
    cols += ["stored as", "bits", "grid"] if compressed else []
    for col in cols + ["group", "prunable"]:
        table.add_column(col, justify="right" if col in ("params", "MACs", "bytes", "group", "bits") else "left")
    for k in info["kernels"]:
        st = k.get("stored") or {}
        extra = [st.get("encoding", "?"), str(st.get("bits") or "?"), st.get("granularity") or ""] if compressed else []
        table.add_row(str(k["block"]), k["name"], k["op"], "x".join(map(str, k["shape"])), _human(k["params"]),
                      _human(k["macs"]), f"{k['bytes']:,}" if compressed else _human(k["bytes"]), *extra,
                      str(k["group"]), "yes" if k["prunable"] else "no")
    console.print(table)
    if sensitivity:
        st = Table(title=f"Fisher sensitivity ({info['sensitivity']['loss']}, n={info['sensitivity']['n_samples']}; "
                         "shares of the total, per block then per kernel)")
        for col in ("block", "share", "kernels (share)"):
            st.add_column(col)
        per_kernel = info["sensitivity"]["per_kernel"]
        for b in info["blocks"]:
            shares = ", ".join(f"{k} ({per_kernel[k]:.3f})" for k in b["kernels"])
            st.add_row(str(b["id"]), f"{info['sensitivity']['per_block'][str(b['id'])]:.3f}", shares)
        console.print(st)
    if groups:
        gt = Table(title="Channel groups")
        for col in ("id", "channels", "producers", "prunable / reason"):
            gt.add_column(col)
        for g in info["groups"]:
            prods = ", ".join(g["producers"][:4]) + (f" (+{len(g['producers']) - 4})" if len(g["producers"]) > 4 else "")
            gt.add_row(str(g["id"]), str(g["channels"]), prods, "yes" if g["prunable"] else f"no: {g['refusal']}")
        console.print(gt)


def _print_file(console, info: dict) -> None:
    """A compressed file's true bytes, its needs, and the runtimes that load it."""
    f, t = info["file"], info["totals"]
    console.print(f"stored: {fmt_bytes(t['weight_bytes'])} of weights (true bytes: every initializer as the file "
                  f"holds it), {fmt_bytes(t['decoded_weight_bytes'])} once decoded to fp32 "
                  f"({t['ratio_to_decoded']:.2f}x); file {fmt_bytes(f['file_bytes'])}", highlight=False)
    needs = f"; {', '.join(f['needs'])}" if f["needs"] else ""
    console.print(f"needs: opset {f['opset']}, IR version {f['ir_version']}; element types "
                  f"{', '.join(f['element_types'])}{needs}", highlight=False)
    for r in info.get("runtimes", []):
        name = r["runtime"] + (f" {r['version']}" if r.get("version") else "")
        if r["loads"] is None:
            verdict = "expected to load" if r.get("expected") else "expected to refuse"
            console.print(f"runtime: {name}: {verdict} ({r['how']})", highlight=False)
        else:
            verdict = "loads it" if r["loads"] else f"REFUSES it: {r.get('error', '')}"
            console.print(f"runtime: {name}: {verdict}", highlight=False)
