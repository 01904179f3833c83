"""Writing outputs atomically: a reader never sees a half-written model, report or search state."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hirelc_onnx.kill_points import kill_point

__all__ = ["write_atomic", "write_json", "json_default", "remove_temporaries"]

_TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}" + re.escape(_TEMP_SUFFIX) + "$")
"""`.<name>.<mkstemp's 8 random characters>.tmp`: the temporary copy `write_atomic` renames into place."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename.

    A process killed mid-write leaves `path` as it was, plus a hidden temporary that
    `remove_temporaries` sweeps away.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            view = memoryview(data)  # halves without copying (a model can be gigabytes)
            fh.write(view[:len(view) // 2])
            fh.flush()
            kill_point(f"write:{path.name}")  # kill-and-resume tests: die with the file half written
            fh.write(view[len(view) // 2:])
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_default(obj: Any) -> Any:
    """numpy scalars and arrays as plain JSON; anything else by its str()."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """`obj` as JSON (numpy values converted), written atomically with a trailing newline."""
    write_atomic(path, (json.dumps(obj, indent=indent, default=json_default) + "\n").encode())


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries that writers killed mid-write left in `folder`; returns what was removed.

    Only for a folder this process holds (lock.hold_out_dir): a live writer's temporary would go too.
    One that cannot be removed stays (it is hidden, and never read).
    """
    removed = []
    for entry in Path(folder).iterdir():
        if _TEMP_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink():
            try:
                entry.unlink()
            except OSError:
                continue
            removed.append(entry)
    return removed
