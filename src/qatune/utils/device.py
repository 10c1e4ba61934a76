"""Where tensors live and in which dtype: the one place that picks a default device and names the
precisions (which precision `auto` trains in is measured: `qatune.utils.precision_probe`).

    default_device(None)   -> cuda if a GPU is visible, else cpu
    DTYPES["bf16"]         -> torch.bfloat16
"""

from __future__ import annotations

import functools
import warnings

import torch

from qatune.errors import UserError
from qatune.utils.precision_probe import cpu_choice

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
def warn_slow_cpu_precision(precision: str) -> None:
    """Once per process: a bf16 run on a CPU whose bf16 matmul measured slower than its fp32 one
    (`qatune.utils.precision_probe`, the measurement `precision: auto` picks by; cached per machine).

    Without AVX512-BF16 or AMX PyTorch emulates bf16 through fp32 conversions. Measured on a
    2-core AVX2-only CPU (torch 2.13): one training step of a 4-layer d=256 GPT-2 in bf16 autocast
    took ~30x the fp32 step — the LM-head matmul shapes fall back to a slow reference kernel there."""
    if precision != "bf16":
        return
    rates = cpu_choice().rates
    if rates["bf16"] < rates["fp32"]:
        warnings.warn(
            f"precision bf16 on a CPU whose bf16 matmul measured {rates['bf16'] / 1e9:,.0f} GFLOP/s against "
            f"{rates['fp32'] / 1e9:,.0f} in fp32 (no AVX512-BF16/AMX): expect the run to be far slower than fp32 "
            "(a bf16 step of a 4-layer GPT-2 was measured ~30x slower on an AVX2-only CPU); "
            "precision=auto picks by this measurement",
            stacklevel=3,
        )
