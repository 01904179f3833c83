"""memory.py against glibc's own account of its mappings (mallinfo2) and the process's resident memory:
which blocks get a mapping of their own, in and out of a fine-tune's kept heap.

Each case runs in a fresh interpreter: the heap's settings are the process's, and a test worker that
has run other tests may hold a kept heap in a thread it left behind."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hirelc_onnx import memory

_PRELUDE = """
import ctypes, os
import numpy as np
from hirelc_onnx import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = memory._glibc()
libc.mallinfo2.restype = MallInfo2

def mapped_while_holding(nbytes):
    before = libc.mallinfo2().hblkhd
    block = np.ones(nbytes, dtype=np.uint8)
    held = libc.mallinfo2().hblkhd - before
    del block
    return held

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

memory.bound_heap()
"""


def _run(body: str) -> list[int]:
    libc = memory._glibc()
    if not libc or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc 2.33 or newer (mallinfo2)")
    done = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return [int(x) for x in done.stdout.split()]


def test_a_kept_heap_serves_big_blocks_from_the_heap_and_the_bound_returns_on_leaving():
    size = 4 << 20
    bounded, kept, nested, outer, after = _run(f"""
        out = [mapped_while_holding({size})]  # bounded: a 4 MiB block is a mapping of its own
        with memory.heap_kept_for_reuse():
            out.append(mapped_while_holding({size}))
            with memory.heap_kept_for_reuse():
                out.append(mapped_while_holding({size}))
            out.append(mapped_while_holding({size}))  # the inner exit leaves the outer's setting alone
        out.append(mapped_while_holding({size}))
        print(*out)
    """)
    assert bounded >= size and after >= size
    assert kept == nested == outer == 0


def test_a_kept_heap_gives_its_freed_memory_back_on_leaving():
    held, left = _run("""
        with memory.heap_kept_for_reuse():
            blocks = [np.ones(8 << 20, dtype=np.uint8) for _ in range(4)]
            del blocks
            held = resident()  # freed, kept for the next request
        print(held, resident())
    """)
    assert held - left >= 24 << 20
