"""memory.py against glibc's own account of its mappings (mallinfo2): which blocks get a mapping of
their own, in and out of a fine-tune's kept heap."""
from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from hirelc_onnx import memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    libc = memory._glibc()
    if not libc or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc 2.33 or newer (mallinfo2)")
    libc.mallinfo2.restype = _MallInfo2
    return libc


def _mapped_while_holding(libc, nbytes: int) -> int:
    """Bytes glibc holds in mappings of their own while one block of `nbytes` is alive, minus before."""
    before = libc.mallinfo2().hblkhd
    block = np.ones(nbytes, dtype=np.uint8)
    held = libc.mallinfo2().hblkhd - before
    del block
    return held


def test_a_kept_heap_serves_big_blocks_from_the_heap_and_the_bound_returns_on_leaving():
    libc = _libc()
    memory.bound_heap()
    size = 4 << 20
    assert _mapped_while_holding(libc, size) >= size  # bounded: a 4 MiB block is a mapping of its own
    with memory.heap_kept_for_reuse():
        assert _mapped_while_holding(libc, size) == 0
        with memory.heap_kept_for_reuse():
            assert _mapped_while_holding(libc, size) == 0
        assert _mapped_while_holding(libc, size) == 0  # the inner exit leaves the outer's setting alone
    assert _mapped_while_holding(libc, size) >= size


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_kept_heap_gives_its_freed_memory_back_on_leaving():
    _libc()
    memory.bound_heap()
    with memory.heap_kept_for_reuse():
        blocks = [np.ones(8 << 20, dtype=np.uint8) for _ in range(4)]
        del blocks
        held = _resident_bytes()  # freed, kept for the next request
    assert held - _resident_bytes() >= 24 << 20
