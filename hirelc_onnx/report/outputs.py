"""The --out folder: model.onnx, config.json, report.json, report.html, each written atomically."""
from __future__ import annotations

from pathlib import Path

import onnx

from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.io import write_atomic, write_json
from hirelc_onnx.report.html import render_html

__all__ = ["OUTPUT_FILES", "check_out_dir", "write_outputs"]

OUTPUT_FILES = ("model.onnx", "config.json", "report.json", "report.html")


def check_out_dir(out_dir: Path, model_path: Path) -> None:
    """Refuse a folder whose model.onnx would be the input model, or a path that is a file."""
    out_dir = Path(out_dir)
    if (out_dir / "model.onnx").resolve() == Path(model_path).resolve():
        raise UserError(f"--out {out_dir} would overwrite the input model; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")


def write_outputs(out_dir: Path, model_path: Path, model: onnx.ModelProto, config: CompressionConfig | None,
                  report: dict) -> None:
    """Write the outputs into `out_dir` (never over the input); `report` gains their paths ("outputs")."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, model_path)
    write_atomic(out_dir / "model.onnx", model.SerializeToString())
    if config is not None:
        write_json(out_dir / "config.json", config.to_dict())
    report["outputs"] = {name: str(out_dir / name) for name in OUTPUT_FILES}
    write_json(out_dir / "report.json", report)
    write_atomic(out_dir / "report.html", render_html(report).encode())
