"""Named accelerators: memory and dense (no 2:4 sparsity) peak throughput, from vendor datasheets.

Peaks are in TFLOP/s for 16-bit tensor-core matmuls accumulating in fp32 (what PyTorch's bf16/
fp16 matmuls do) and for plain fp32 (PyTorch's default `float32_matmul_precision="highest"`, no
TF32). Sources: NVIDIA H100 datasheet (SXM 989 / PCIe 756 bf16 dense; they print 1,979 / 1,513
"with sparsity"), H200 datasheet, A100 datasheet (312 bf16, 19.5 fp32), L4 datasheet (121 dense;
242 with sparsity), L40S datasheet (362 dense), NVIDIA Ada Lovelace architecture whitepaper
appendix for the RTX 4090 (165.2 TFLOP/s fp16/bf16 with fp32 accumulate dense; the 330 figure is
fp16 accumulate or sparsity: GeForce runs fp32-accumulate at half rate), Ampere GA102 whitepaper
for the RTX 3090 (71 with fp32 accumulate), AMD MI300X datasheet (1,307 bf16 dense). V100 and T4
have no bf16: their 16-bit figure is fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

from qatune.errors import UserError


@dataclass(frozen=True)
class Accelerator:
    key: str
    name: str
    memory_gb: float  # as sold (10^9 bytes)
    bf16_tflops: float  # dense, fp32 accumulate
    fp32_tflops: float
    has_bf16: bool = True


ACCELERATORS: dict[str, Accelerator] = {
    a.key: a
    for a in (
        Accelerator("h100-sxm", "NVIDIA H100 SXM 80GB", 80, 989.0, 67.0),
        Accelerator("h100-pcie", "NVIDIA H100 PCIe 80GB", 80, 756.0, 51.0),
        Accelerator("h200", "NVIDIA H200 SXM 141GB", 141, 989.0, 67.0),
        Accelerator("a100", "NVIDIA A100 SXM 80GB", 80, 312.0, 19.5),
        Accelerator("a100-40gb", "NVIDIA A100 40GB", 40, 312.0, 19.5),
        Accelerator("l40s", "NVIDIA L40S 48GB", 48, 362.0, 91.6),
        Accelerator("l4", "NVIDIA L4 24GB", 24, 121.0, 30.3),
        Accelerator("rtx-4090", "NVIDIA GeForce RTX 4090 24GB", 24, 165.2, 82.6),
        Accelerator("rtx-3090", "NVIDIA GeForce RTX 3090 24GB", 24, 71.0, 35.6),
        Accelerator("v100", "NVIDIA V100 SXM2 32GB (fp16, no bf16)", 32, 125.0, 15.7, has_bf16=False),
        Accelerator("t4", "NVIDIA T4 16GB (fp16, no bf16)", 16, 65.0, 8.1, has_bf16=False),
        Accelerator("mi300x", "AMD Instinct MI300X 192GB", 192, 1307.0, 163.4),
    )
}


def get_accelerator(key: str) -> Accelerator:
    try:
        return ACCELERATORS[key]
    except KeyError:
        raise UserError(f"unknown accelerator {key!r}; known: {', '.join(ACCELERATORS)}") from None


def peak_tflops(acc: Accelerator, precision: str) -> float:
    """Dense peak for the matmul dtype a precision mode uses."""
    if precision == "fp32":
        return acc.fp32_tflops
    if precision.startswith("bf16") and not acc.has_bf16:
        raise UserError(f"{acc.name} has no bf16 tensor cores; use fp16 or fp32")
    return acc.bf16_tflops
