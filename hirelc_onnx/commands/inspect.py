"""`hirelc-onnx inspect`: what the tool sees in a model, before anything is compressed."""
from __future__ import annotations

import json
from pathlib import Path

import click

from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.loaders import check_fits, graph_inputs, load_data
from hirelc_onnx.graph import import_model

__all__ = ["inspect", "describe"]


def describe(bg) -> dict:
    """A JSON-ready description of a BlockGraph: kernels, blocks, groups, totals."""
    return {
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
             "prunable": k.group is not None and bg.groups[k.group].prunable}
            for k in bg.kernel_list()
        ],
        "groups": [
            {"id": g.id, "channels": g.length, "producers": list(g.producers), "tensors": len(g.tensors),
             "prunable": g.prunable, "refusal": g.refusal}
            for g in bg.groups
        ],
    }


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
def inspect(model: Path, as_json: bool, groups: bool, sensitivity: bool, data: str | None, samples: int,
            seed: int) -> None:
    """Show the blocks, kernels, parameters, MACs, bytes and channel groups of MODEL."""
    if sensitivity and not data:
        raise UserError("--sensitivity needs --data (the Fisher information is an expectation over inputs)")
    bg = import_model(model)
    info = describe(bg)
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
    console.print(f"{t['kernels']} kernels in {t['blocks']} blocks, {_human(t['kernel_params'])} kernel params, "
                  f"{_human(t['macs'])} MACs/sample, {t['weight_bytes'] / 1e6:.2f} MB of weights; "
                  f"{t['prunable_groups']}/{t['channel_groups']} channel groups prunable")
    table = Table(title="Kernels", show_lines=False)
    for col in ("block", "kernel", "op", "weight shape", "params", "MACs", "bytes", "group", "prunable"):
        table.add_column(col, justify="right" if col in ("params", "MACs", "bytes", "group") else "left")
    for k in info["kernels"]:
        table.add_row(str(k["block"]), k["name"], k["op"], "x".join(map(str, k["shape"])), _human(k["params"]),
                      _human(k["macs"]), _human(k["bytes"]), str(k["group"]), "yes" if k["prunable"] else "no")
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
