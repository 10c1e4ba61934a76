"""How glibc's malloc treats the memory a CPU training run frees (glibc only), chosen with
$QATUNE_MALLOC:

    keep   serve every allocation from the heap (no mmap) and never trim it: freed tensors stay
           mapped, so the next step reuses their pages without page faults
    glibc  glibc's own policy: allocations over its mmap threshold (128 KiB, raised up to 32 MB
           as large blocks are freed) get their own mmap and go back to the OS when freed

glibc serves every allocation over 32 MB with a fresh `mmap` and returns it to the OS on free. A
training step allocates several such tensors each time (the tied embedding's gradients are
vocab x d: 51 MB for a d=256 model), so every step page-faults them in again (a fresh page is
zero-filled by the kernel on first touch; docs/performance.md has the measured cost). `keep`
avoids that; its cost is RSS: the heap keeps the high-water mark of every step, and blocks freed
between differently sized steps (packed rows of varying length) fragment it. The default and the
measured trade-off are in docs/performance.md ("The glibc allocator setting").
"""

from __future__ import annotations

import ctypes
import os
import sys

from qatune.errors import UserError

ENV = "QATUNE_MALLOC"
MODES = ("keep", "glibc")
DEFAULT = "keep"
# oneDNN (which runs PyTorch's bf16 matmuls on a CPU) and PyTorch's ideep layer over it each keep an
# LRU cache of compiled primitives keyed by shape, 1024 entries by default, and every entry holds
# memory. Packed rows give every step new shapes, so a bf16 run's live heap grew with every step:
# +65 MB per step at GPT-2 small (8 rows of packed examples of 64-512 tokens; fp32 runs, through
# MKL, stayed flat), 0.85 MB per new shape per cache for one 768 x 3072 linear layer. 64 entries
# hold more than the distinct matmul shapes of one step (12 per sequence length: 4 linear layers,
# forward and two backward products), so a step reuses its own.
KERNEL_CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
KERNEL_CACHE_CAPACITY = "64"
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied: str | None = None


def allocator_mode() -> str:
    """$QATUNE_MALLOC, else the default; a one-line error for anything else."""
    mode = os.environ.get(ENV, "").strip().lower() or DEFAULT
    if mode not in MODES:
        raise UserError(f"${ENV}={os.environ[ENV]!r} is not one of {', '.join(MODES)}")
    return mode


def configure_cpu_allocator() -> str:
    """Apply $QATUNE_MALLOC's mode to this process (once; training on a CPU calls it when it
    starts) and return it; "glibc" where nothing was changed (also on other platforms or C
    libraries, where `keep` cannot apply)."""
    global _applied
    if _applied is None:
        _applied = "keep" if allocator_mode() == "keep" and keep_freed_memory() else "glibc"
    return _applied


def bound_kernel_caches() -> None:
    """Cap oneDNN's and ideep's primitive caches (`KERNEL_CACHE_ENV`) unless the environment sets
    them. Read when the first bf16 matmul builds its cache, so call it before any: a CPU run does
    when it starts, before the precision probe."""
    for name in KERNEL_CACHE_ENV:
        os.environ.setdefault(name, KERNEL_CACHE_CAPACITY)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc not to use mmap and not to trim the heap; True if it applied.

    A no-op (False) on other platforms or C libraries. Process-wide: the process then keeps its
    peak memory until it exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


_MALLINFO2 = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2]


def heap_info() -> dict[str, int] | None:
    """glibc's own account (mallinfo2, glibc >= 2.33), in bytes: `in_use` (allocated from the heap),
    `free_in_heap` (freed, still mapped: what `keep` retains), `mmapped`; None elsewhere."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    m = fn()
    return {"in_use": m.uordblks, "free_in_heap": m.fordblks, "mmapped": m.hblkhd}
