"""The --out folder: model.onnx, config.json, footprints.json, report.json, report.html, each written atomically.

footprints.json holds every measured candidate's per-kernel config and figures (report/build.py:
footprints), so a user can pick another point and re-apply it (`hirelc-onnx apply`); it moves out
of the report dict into its own file (report.json's history has the same candidates, without configs).

A model whose serialized size passes EXTERNAL_DATA_BYTES (protobuf cannot hold 2 GiB) is written as
model.onnx plus model.onnx.data beside it, which every ONNX reader follows.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.graph.external_data import save_external, serialized_nbytes
from hirelc_onnx.io import temporary_beside, write_atomic, write_json
from hirelc_onnx.report.html import render_html

__all__ = ["OUTPUT_FILES", "EXTERNAL_DATA_FILE", "EXTERNAL_DATA_BYTES", "check_out_dir", "write_outputs",
           "write_model"]

OUTPUT_FILES = ("model.onnx", "config.json", "footprints.json", "report.json", "report.html")
EXTERNAL_DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_BYTES = 1 << 30  # models serializing to more are written with external data


def check_out_dir(out_dir: Path, model_path: Path) -> None:
    """Refuse a folder whose model.onnx would be the input model, or a path that is a file."""
    out_dir = Path(out_dir)
    if (out_dir / "model.onnx").resolve() == Path(model_path).resolve():
        raise UserError(f"--out {out_dir} would overwrite the input model; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")


def write_outputs(out_dir: Path, model_path: Path, model: onnx.ModelProto, config: CompressionConfig | None,
                  report: dict, external_over: int | None = None) -> None:
    """Write the outputs into `out_dir` (never over the input); `report` gains their paths ("outputs")
    and gives up "footprints" (build.py: footprints) to footprints.json.

    external_over: serialized bytes beyond which model.onnx keeps its weights in model.onnx.data
    (default EXTERNAL_DATA_BYTES).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, model_path)
    external = write_model(out_dir / "model.onnx", model, external_over)
    if config is not None:
        write_json(out_dir / "config.json", config.to_dict())
    footprints = report.pop("footprints", None)  # moves out of the report into its own file
    if footprints is not None:
        write_json(out_dir / "footprints.json", footprints)
    written = {"config.json": config is not None, "footprints.json": footprints is not None}
    names = OUTPUT_FILES[:1] + ((EXTERNAL_DATA_FILE,) if external else ()) + tuple(
        n for n in OUTPUT_FILES[1:] if written.get(n, True))
    report["outputs"] = {name: str(out_dir / name) for name in names}
    write_json(out_dir / "report.json", report)
    write_atomic(out_dir / "report.html", render_html(report).encode())


def write_model(path: Path, model: onnx.ModelProto, external_over: int | None = None) -> bool:
    """Write `model` to `path` atomically; with external data (`<path name>.data`) when it serializes
    to more than `external_over` bytes. True when external data was written.

    Never half-written: the data goes to a temporary file, the old model.onnx is removed, the data
    renamed into place, then the header written atomically; a reader sees the old model, none, or
    the new one. A stale data file from an earlier, bigger model is removed.
    """
    path = Path(path)
    limit = EXTERNAL_DATA_BYTES if external_over is None else external_over
    data_file = path.parent / f"{path.name}.data"
    if serialized_nbytes(model) <= limit:
        write_atomic(path, model.SerializeToString())
        data_file.unlink(missing_ok=True)
        return False
    tmp_data = temporary_beside(data_file)  # swept by the lock if this process dies before the rename
    try:
        header = save_external(model, tmp_data, data_file.name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_data, 0o666 & ~umask)
        path.unlink(missing_ok=True)
        os.replace(tmp_data, data_file)
    except BaseException:
        Path(tmp_data).unlink(missing_ok=True)
        raise
    write_atomic(path, header.SerializeToString())
    return True
