"""Where tensors live and in which dtype: the one place that picks a default device and names the
precisions.

    default_device(None)   -> cuda if a GPU is visible, else cpu
    DTYPES["bf16"]         -> torch.bfloat16
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

from qatune.errors import UserError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device(name: str | None = None) -> torch.device:
    """`name` when given (cpu, cuda, cuda:1 …), else the GPU when one is visible, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_of(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"precision {name!r} is not one of {', '.join(DTYPES)}") from None


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU instructions that oneDNN's bf16 matmuls need to be fast.
    Without them PyTorch emulates bf16 through fp32 conversions (see `warn_slow_cpu_precision`)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: we cannot tell, so we do not warn
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def warn_slow_cpu_precision(precision: str) -> None:
    """Once per process: a half-precision run on a CPU without native bf16 support.

    Measured on a 2-core AVX2-only CPU (torch 2.13): one training step of a 4-layer d=256 GPT-2 in
    bf16 autocast took ~30x the fp32 step — the LM-head matmul shapes fall back to a slow
    reference kernel there."""
    if precision in ("bf16", "fp16") and not cpu_has_native_bf16():
        warnings.warn(
            f"precision {precision} on a CPU without AVX512-BF16/AMX: expect it to be far slower than fp32 "
            "(a bf16 step of a 4-layer GPT-2 was measured ~30x slower on an AVX2-only CPU); "
            "precision=auto picks fp32 on CPUs",
            stacklevel=3,
        )
