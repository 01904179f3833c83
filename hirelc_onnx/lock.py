"""One compress per --out folder: an OS advisory lock that dies with the process holding it.

`fcntl.flock` on `.hirelc.lock` inside the folder: the kernel releases it when the holder exits or is
killed, so a crashed run never leaves a stale lock to clean up. The file holds the holder's pid (for
the refusal message) and is removed when the lock is released normally. Once held, the folder is this
run's alone, so the hidden temporaries a killed run left half-written (io.write_atomic) are removed.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hirelc_onnx.errors import UserError
from hirelc_onnx.io import remove_temporaries

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, runs are not guarded
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "OutDirInUseError", "hold_out_dir"]

LOCK_NAME = ".hirelc.lock"


class OutDirInUseError(UserError):
    """Another compress holds the --out folder."""


@contextmanager
def hold_out_dir(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold `out_dir` (created if missing) for the block; OutDirInUseError if another process holds it.

    A folder this call created and that is still empty afterwards is removed again, so a run that
    fails before writing anything leaves nothing behind. Temporaries of killed writers are removed
    once the lock is held.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = _acquire(out_dir / LOCK_NAME) if fcntl is not None else None
    except OSError as exc:
        raise UserError(f"cannot use --out {out_dir}: {exc.strerror or exc}") from None
    try:
        if fd is not None:
            remove_temporaries(out_dir)
        yield
    finally:
        if fd is not None:
            _release(out_dir / LOCK_NAME, fd)
        if created:
            try:
                out_dir.rmdir()  # only succeeds when empty
            except OSError:
                pass


def _acquire(lock_path: Path) -> int:
    """An open descriptor holding the exclusive lock on the file now at `lock_path`."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (pid {holder})" if holder else ""
            raise OutDirInUseError(f"--out {lock_path.parent} is in use by another hirelc-onnx compress{who}; "
                                   "wait for it or choose another folder") from None
        except BaseException:
            os.close(fd)
            raise
        # the holder we waited on may have removed the file after we opened it: lock the current one
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _release(lock_path: Path, fd: int) -> None:
    """Remove the lock file, then drop the lock (in that order, so no one locks a file about to vanish)."""
    try:
        lock_path.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
