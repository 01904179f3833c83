"""The C heap of this process: big blocks handed back to the OS as soon as they are freed.

glibc serves blocks over a moving threshold from its heap once a big block has been freed, and keeps
freed heap memory for reuse. Loading a model's weights tensor by tensor (a bytes object, then the
protobuf's copy) or building an ONNX Runtime session (folded constants, weights before prepacking)
then leaves the process holding about twice the weights. Fixing the threshold at 1 MiB makes every
big block its own mapping, returned on free; `release_freed_memory` returns what the heap still
holds (after collecting garbage cycles). Both leave the heap alone where the C library is not glibc.

Training is the exception: a torch step allocates and frees the same large activations and gradients
over and over, and with every big block its own mapping each one is mapped, faulted in page by page
and unmapped again at every step. `heap_kept_for_reuse` lifts the bound while a fine-tune runs: no
mappings, nothing trimmed, freed blocks served again; on leaving, the bound is back and the free heap
is returned. EfficientNet-Lite0 in torch on 2 cores (256 photo-sized inputs in batches of 64, a VM
where a page fault is dear): inference 13.0 -> 4.5 s (kernel time 15.5 -> 0.5 s), three training
steps 29.0 -> 12.9 s (kernel time 26.5 -> 1.5 s); the same outputs, only where blocks live.
"""
from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["bound_heap", "heap_kept_for_reuse", "release_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameters (glibc malloc.h)
_DEFAULT_MMAP_MAX, _DEFAULT_TRIM = 65536, 128 * 1024  # glibc's defaults, restored on leaving a kept heap
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int
_THRESHOLD = 1 << 20
_libc = None
_bounded = False
_kept_depth = 0
_kept_lock = threading.Lock()


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


@contextmanager
def heap_kept_for_reuse() -> Iterator[None]:
    """While inside, every block comes from the heap and freed ones stay there for the next request
    (no mappings, no trimming); on leaving the last of nested or concurrent uses, blocks of 1 MiB and
    more get their own mappings again (`bound_heap`) and the free heap goes back to the OS."""
    global _kept_depth
    libc = _glibc()
    with _kept_lock:
        _kept_depth += 1
        if _kept_depth == 1 and libc:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield
    finally:
        with _kept_lock:
            _kept_depth -= 1
            if _kept_depth == 0 and libc:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
                if _bounded:
                    libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
                libc.malloc_trim(0)
