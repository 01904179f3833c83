"""`hirelc-onnx apply`: re-apply a saved config (a run's config.json, or a point of its footprints.json).

The config is applied to the original fp32 model the way a run applies it (prune by channel
importance, quantize for the config's target; ort-cpu / qdq calibrate activations on the same
seeded calibration split a run with the same data and seed uses, synthesised inputs without
--data), with no fine-tuning: a run that fine-tuned its weights emitted different values for the
same config, a run without fine-tuning (data-free, or --finetune-epochs 0) the same bytes.
Writes model.onnx, config.json and apply.json (its size; its test score with --data) into --out.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from hirelc_onnx.apply import apply_config
from hirelc_onnx.compress import _load_data
from hirelc_onnx.config import CompressionConfig, ConfigError
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import split_dataset
from hirelc_onnx.evaluate.runner import model_file_size
from hirelc_onnx.evaluate.synthetic import synthesize
from hirelc_onnx.graph import build_block_graph, load_model
from hirelc_onnx.graph.blockgraph import with_input_dims
from hirelc_onnx.graph.stored import stored_model
from hirelc_onnx.io import write_json
from hirelc_onnx.lock import hold_out_dir
from hirelc_onnx.report.outputs import check_out_dir, clear_run_files, write_model
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.units import fmt_bytes
from passes.storage import initializer_nbytes

__all__ = ["apply", "read_config", "reapply"]


def read_config(path: Path, candidate: int | None = None) -> tuple[CompressionConfig, str]:
    """The config in `path` and where it came from: a config.json, one candidate entry of
    footprints.json, or a whole footprints.json (its `candidate`, default the emitted model's)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory: give its config.json or footprints.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a config object (a run's config.json or footprints.json)")
    source = str(path)
    if "candidates" in data:  # a whole footprints.json
        candidates = data["candidates"] if isinstance(data["candidates"], list) else []
        if candidate is None:
            candidate = (data.get("emitted") or {}).get("candidate")
            if candidate is None:
                raise UserError(f"{path} holds {len(candidates)} candidates and none is the emitted model: "
                                "choose one with --candidate ID")
        if not 0 <= candidate < len(candidates):
            raise UserError(f"--candidate {candidate} is not in {path} (ids 0..{len(candidates) - 1})")
        data, source = candidates[candidate], f"{path} candidate {candidate}"
    elif candidate is not None:
        raise UserError(f"--candidate picks a point of a footprints.json; {path} is a single config")
    if "config" in data and isinstance(data["config"], dict):  # one entry of footprints.json
        data = data["config"]
    if "kernels" not in data:
        raise UserError(f"{path}: no 'kernels' object: not a config.json nor a footprints.json entry")
    try:
        return CompressionConfig.from_dict(data), source
    except (ConfigError, TypeError) as exc:  # TypeError: a field of the wrong kind for KernelConfig
        raise UserError(f"{source}: {exc}") from None


def reapply(model_path: str | Path, config: CompressionConfig, out_dir: str | Path, *, data: Any = None,
            seed: int = 0, source: str = "", overwrite: bool = False) -> dict:
    """Apply `config` to the fp32 model at `model_path`, write the outputs into `out_dir`, and return
    what apply.json holds (sizes; with `data`, fp32 and compressed scores on the test split).

    A folder holding a run's files is refused unless `overwrite`, which clears them first (as
    compress --overwrite does)."""
    out_dir, model_path = Path(out_dir), Path(model_path)
    check_out_dir(out_dir, model_path, overwrite=overwrite)
    raw = load_model(model_path)
    stored = stored_model(raw)
    if stored.compressed:
        kinds = sorted({k.encoding for k in stored.kernels if k.encoding != "fp32"})
        raise UserError(f"{model_path} is already compressed ({', '.join(kinds)} weights): apply a config to the "
                        "original fp32 model")
    bg = build_block_graph(raw, inplace=True)
    del raw
    try:
        config.validate(bg.kernels)
    except ConfigError as exc:
        raise UserError(f"the config does not fit {model_path}: {exc}") from None
    ctx = _context(bg, config, data, seed) if data is not None or config.target != "storage" else None
    calib = ctx.calib_batches if ctx is not None and config.target != "storage" else None
    model = apply_config(bg, config, calib_batches=calib)
    weight_bytes = initializer_nbytes(model)
    left = sorted(set(bg.kernels) - set(config.kernels))
    unpruned = sorted(n for n, kc in config.kernels.items() if kc.pruned and
                      (bg.kernels[n].group is None or not bg.groups[bg.kernels[n].group].prunable))
    summary: dict[str, Any] = {
        "model": str(model_path), "config": source, "target": config.target,
        "size": {"original_weight_bytes": bg.weight_bytes, "weight_bytes": weight_bytes,
                 "ratio": bg.weight_bytes / max(weight_bytes, 1), "file_bytes": model_file_size(model)},
        "kernels_left_fp32_not_in_config": left,
        "keep_ignored_unprunable": unpruned,
        "finetuned": False,
        "accuracy": None,
        "outputs": {name: str(out_dir / name) for name in ("model.onnx", "config.json", "apply.json")},
    }
    if data is not None:
        test = ctx.splits.test
        fp32, comp = ctx.score(ctx.reference(test), test), ctx.score_model(model, test)
        value = ctx.objective.value
        summary["accuracy"] = {"metric": ctx.objective.name(test.classes is not None), "split": "test", "n": len(test),
                               "fp32": value(fp32), "compressed": value(comp), "drop_points": 100.0 * (fp32 - comp)}
    with hold_out_dir(out_dir):  # one writer per folder, as compress
        if overwrite:
            clear_run_files(out_dir)
        write_model(out_dir / "model.onnx", model)
        write_json(out_dir / "config.json", config.to_dict())
        write_json(out_dir / "apply.json", summary)
    return summary


def _context(bg, config: CompressionConfig, data: Any, seed: int):
    """The calibration and test splits a compress run with the same data and seed has (synthesised
    inputs without data, as a data-free run)."""
    if data is None:
        ds, _ = synthesize(bg.model, {}, seed=seed)
        return SearchContext(with_input_dims(bg, ds.sample_shapes), split_dataset(ds, seed), config.target,
                             seed=seed, finetune_epochs=0, data_free=True)
    ds = _load_data(data, bg, {})
    return SearchContext(with_input_dims(bg, ds.sample_shapes), split_dataset(ds, seed), config.target, seed=seed,
                         finetune_epochs=0)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output folder (created): model.onnx, config.json, apply.json.")
@click.option("--candidate", type=int, help="With a footprints.json: the candidate id to apply "
              "(default: the run's emitted model).")
@click.option("--data", help="Score the model on the test split of this data (.npz, image folder, 'digits' or "
              "package.module:func), and calibrate ort-cpu / qdq activations on it as a run does.")
@click.option("--seed", type=int, default=0, show_default=True, help="The run's seed: the same data splits.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier run or apply in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print apply.json instead of the summary.")
def apply(model: Path, config: Path, out_dir: Path, candidate: int | None, data: str | None, seed: int,
          overwrite: bool, as_json: bool) -> None:
    """Re-apply CONFIG (a run's config.json, a footprints.json entry, or footprints.json with --candidate)
    to the fp32 MODEL, without fine-tuning, and write the model to --out."""
    chosen, source = read_config(config, candidate)
    summary = reapply(model, chosen, out_dir, data=data, seed=seed, source=source, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    size = summary["size"]
    click.echo(f"applied {source} (target {summary['target']}, no fine-tuning) to {model}")
    click.echo(f"weights: {fmt_bytes(size['original_weight_bytes'])} -> {fmt_bytes(size['weight_bytes'])} stored "
               f"({size['ratio']:.2f}x true bytes); file {fmt_bytes(size['file_bytes'])}")
    acc = summary["accuracy"]
    if acc:
        click.echo(f"{acc['metric']} (test split, n={acc['n']}): fp32 {acc['fp32']:.4f}, this model "
                   f"{acc['compressed']:.4f} ({-acc['drop_points']:+.2f} points)")
    if summary["kernels_left_fp32_not_in_config"]:
        click.echo(f"{len(summary['kernels_left_fp32_not_in_config'])} kernels are not in the config: left fp32")
    if summary["keep_ignored_unprunable"]:
        click.echo(f"keep ratio ignored for {len(summary['keep_ignored_unprunable'])} kernels whose channels cannot "
                   "be pruned (see `hirelc-onnx inspect`)")
    click.echo(f"outputs in {out_dir}/: model.onnx, config.json, apply.json")
