"""The --out folder: model.onnx, config.json, report.json, report.html, each written atomically.

A model whose serialized size passes EXTERNAL_DATA_BYTES (protobuf cannot hold 2 GiB) is written as
model.onnx plus model.onnx.data beside it, which every ONNX reader follows.

A folder is one run's: `RUN_FILES` names every file a run may leave there (the outputs and HiReLC's
search state), so a second run into it is refused unless told to resume the first or to clear it
(`check_out_dir`, `clear_run_files`), and never touches a file of anyone else's.
"""
from __future__ import annotations

import os
from fnmatch import fnmatchcase
from pathlib import Path

import onnx

from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.graph.external_data import save_external, serialized_nbytes
from hirelc_onnx.io import temporary_beside, write_atomic, write_json
from hirelc_onnx.report.html import render_html

__all__ = ["OUTPUT_FILES", "EXTERNAL_DATA_FILE", "EXTERNAL_DATA_BYTES", "STATE_FILE", "RUN_FILES",
           "check_out_dir", "check_output_model", "run_files", "clear_run_files", "write_outputs", "write_model"]

OUTPUT_FILES = ("model.onnx", "config.json", "report.json", "report.html")
EXTERNAL_DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_BYTES = 1 << 30  # models serializing to more are written with external data
STATE_FILE = "search_state.json"
"""HiReLC's resumable search state in --out (with its companions, search/hirelc_state.py)."""
RUN_FILES = (*OUTPUT_FILES[:1], EXTERNAL_DATA_FILE, *OUTPUT_FILES[1:], STATE_FILE,
             "search_state.best.r*.onnx", "search_state.agents.r*.pt")
"""Every file (or glob) a run may leave in --out, in the order they are listed; nothing else is ours."""


def check_out_dir(out_dir: Path, model_path: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse, before any work, an --out that cannot take this run's outputs.

    A path ending in .onnx (a model file name, not a folder), a file, a folder whose model.onnx
    would be the input model; with `resume`, a folder without search state; otherwise a folder
    holding another run's files (RUN_FILES), unless `overwrite` (they are cleared once the folder is
    held: `clear_run_files`).
    """
    out_dir = Path(out_dir)
    if out_dir.suffix.lower() == ".onnx":
        raise UserError(f"--out {out_dir} names a model file, but --out is the output folder: "
                        f"give --output-model {out_dir} to write just the model there")
    if (out_dir / "model.onnx").resolve() == Path(model_path).resolve():
        raise UserError(f"--out {out_dir} would overwrite the input model; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if resume:
        if not (out_dir / STATE_FILE).is_file():
            raise UserError(f"--resume: {out_dir} holds no search state ({STATE_FILE}) to continue; "
                            "drop --resume to start afresh")
        return
    earlier = run_files(out_dir)
    if earlier and not overwrite:
        names = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        also = " --resume to continue it," if (out_dir / STATE_FILE).is_file() else ""
        raise UserError(f"--out {out_dir} holds an earlier run ({names}); give{also} --overwrite to replace it, "
                        "or choose another folder")


def check_output_model(path: Path, model_path: Path) -> None:
    """Refuse an --output-model that is the input model or a folder."""
    path = Path(path)
    if path.exists() and path.resolve() == Path(model_path).resolve():
        raise UserError(f"--output-model {path} is the input model; choose another path")
    if path.is_dir():
        raise UserError(f"--output-model {path} is a folder; give a file path such as {path / 'model.onnx'}")


def run_files(out_dir: Path) -> list[Path]:
    """The files of a run in `out_dir` (RUN_FILES), in their listed order; [] when there is no folder."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    present = sorted(p.name for p in out_dir.iterdir() if p.is_file() or p.is_symlink())
    found: list[Path] = []
    for pattern in RUN_FILES:
        found += [out_dir / name for name in present if fnmatchcase(name, pattern) and out_dir / name not in found]
    return found


def clear_run_files(out_dir: Path) -> list[Path]:
    """Remove an earlier run's files from `out_dir` (only RUN_FILES: a user's own files stay); returns them.

    Only for a folder this process holds (lock.hold_out_dir)."""
    removed = run_files(out_dir)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def write_outputs(out_dir: Path, model_path: Path, model: onnx.ModelProto, config: CompressionConfig | None,
                  report: dict, external_over: int | None = None, output_model: Path | None = None) -> None:
    """Write the outputs into `out_dir` (never over the input); `report` gains their paths ("outputs").

    external_over: serialized bytes beyond which model.onnx keeps its weights in model.onnx.data
    (default EXTERNAL_DATA_BYTES). output_model: a path where the model is written as well (for a
    pipeline), listed in "outputs" as "output_model".
    """
    out_dir = Path(out_dir)
    if (out_dir / "model.onnx").resolve() == Path(model_path).resolve():
        raise UserError(f"--out {out_dir} would overwrite the input model; choose another folder")
    external = write_model(out_dir / "model.onnx", model, external_over)
    if config is not None:
        write_json(out_dir / "config.json", config.to_dict())
    names = OUTPUT_FILES[:1] + ((EXTERNAL_DATA_FILE,) if external else ()) + OUTPUT_FILES[1:]
    report["outputs"] = {name: str(out_dir / name) for name in names}
    if output_model is not None:
        write_model(Path(output_model), model, external_over)
        report["outputs"]["output_model"] = str(output_model)
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
