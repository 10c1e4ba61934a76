"""Keep freed memory in the process on CPU training (glibc only).

glibc serves every allocation over 32 MB with a fresh `mmap` and returns it to the OS on free.
A training step allocates several such tensors each time (the tied embedding's gradients are
vocab x d: 51 MB for a d=256 model), so every step page-faults them in again (a fresh page is
zero-filled by the kernel on first touch; docs/performance.md has the measured cost). Serving all
allocations from the heap and never trimming it keeps those pages mapped between steps; the peak
RSS barely moves, since the peak is what the step needs anyway.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc not to use mmap and not to trim the heap; True if it applied.

    A no-op (False) on other platforms or C libraries. Process-wide: training on a CPU calls it
    when it starts; the process then keeps its peak memory until it exits."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
