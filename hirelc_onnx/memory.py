"""The C heap of this process: big blocks handed back to the OS as soon as they are freed.

glibc serves blocks over a moving threshold from its heap once a big block has been freed, and keeps
freed heap memory for reuse. Loading a model's weights tensor by tensor (a bytes object, then the
protobuf's copy) or building an ONNX Runtime session (folded constants, weights before prepacking)
then leaves the process holding about twice the weights. Fixing the threshold at 1 MiB makes every
big block its own mapping, returned on free; `release_freed_memory` returns what the heap still
holds (after collecting garbage cycles). Both leave the heap alone where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import gc

__all__ = ["bound_heap", "release_freed_memory"]

_M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
_THRESHOLD = 1 << 20
_libc = None
_bounded = False


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc


def bound_heap() -> None:
    """Serve blocks of 1 MiB and more by their own mappings from now on (once per process)."""
    global _bounded
    if not _bounded and _glibc():
        _glibc().mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
    _bounded = True


def release_freed_memory(collect: bool = True) -> None:
    """Collect garbage cycles (an onnx-ir model is a cyclic graph holding its weights, which only the
    cycle collector frees, and it runs by object counts, not bytes), then return freed heap memory
    to the OS (malloc_trim). collect=False skips the full collection (about 0.2 s once torch is
    loaded): for small models, whose garbage the collector's own schedule frees soon enough."""
    if collect:
        gc.collect()
    if _glibc():
        _glibc().malloc_trim(0)
