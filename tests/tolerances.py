"""Tolerances for equivalence tests: two runs that are equal in exact arithmetic but not in fp32
(accumulation vs one large batch, DDP/FSDP vs one process, a cached vs a per-step reference).
Rounding differs between kernel families (AVX2, AVX-512, AMX) and thread counts, so a tolerance
here is derived from the computation, not from what one machine happened to give."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch


def assert_weights_match(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lrs: Iterable[float], rtol: float = 1e-3
) -> None:
    """Two runs' weights after the same AdamW steps from the same start (`lrs`: each step's
    learning rate) agree: per tensor, RMS(a - b) <= rtol * sum(lrs).

    Why relative to sum(lrs): with betas (0.9, 0.95) Adam moves an element by at most lr per step
    (Kingma & Ba 2015, sec. 2.1: |m/sqrt(v)| <= 1 when 1 - beta1 <= sqrt(1 - beta2)), so sum(lrs)
    is the largest update a weight can get. A rounding difference d in a gradient element g moves
    its step by ~lr * d/|g|: measured RMS <= 2e-5 * sum(lrs) for every tensor (DPO accumulation,
    2-rank SFT/LoRA/DPO/PPO/GRPO; AVX-512, AVX2 and plain kernels), so rtol 1e-3 leaves 50x for
    other CPUs, while a real difference is 20x above it (one of two micro-batches weighted 0.99: 2e-2; a
    micro-batch dropped: 0.6). An absolute per-element bound does not scale with lr and failed
    (1e-5) on an AMX CPU.

    One exception: the key part of `attn.c_attn.bias` has zero gradient in exact arithmetic
    (q.(k_j + b) = q.k_j + q.b, the same for every key j, which softmax ignores), so its gradient
    is pure rounding noise d, and Adam turns that into steps of lr * d/(|d| + eps): an arbitrary
    share of lr that differs between CPUs (measured up to 9e-3 * sum(lrs) RMS). Those elements
    are held only to Adam's own bound, |a - b| <= 2 * sum(lrs).

    Adam does not see a gradient scaled by the same factor everywhere, so a normalisation off
    uniformly does not show here: compare the logged loss and grad_norm for that.
    """
    scale = sum(lrs)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        diff = a[key].double() - b[key].double()
        if key.endswith("attn.c_attn.bias"):  # [q | k | v]
            q, k, v = diff.chunk(3)
            assert k.abs().max().item() <= 2 * scale, f"{key}: key bias moved more than Adam can"
            diff = torch.cat([q, v])
        rms = diff.norm().item() / math.sqrt(max(diff.numel(), 1))
        assert rms <= rtol * scale, f"{key}: RMS difference {rms:.3g} > {rtol:g} x sum(lr) {scale:.3g}"


def lrs_of(records: Iterable[Mapping]) -> list[float]:
    """The learning rate of every optimizer step in a run's metrics records."""
    return [r["lr"] for r in records if "lr" in r]


def assert_plan_measure_holds(out: Mapping) -> None:
    """`qatune plan --measure --json` on a tiny model: state and saved activations exact, FLOPs
    within 2% (the counter's view of the attention), and the fresh process's peak within 10% + 6 MiB.
    The 6 MiB: the warm-up step does not page in everything; on an AMD EPYC both steps measured a
    steady 4-5 MB over the plan (58.3 MB vs 53.2 full, 31.6 vs 27.3 LoRA), which at these tiny
    sizes is 10-16%."""
    rows = {r["name"].split(" (")[0]: r for r in out["comparison"]}
    for name in ("parameters", "gradients", "optimizer state", "activations saved"):
        assert rows[name]["ratio"] == 1.0, name
    assert abs(rows["FLOPs fwd+bwd"]["ratio"] - 1.0) <= 0.02
    peak = rows["peak, first step"]
    assert abs(peak["measured"] - peak["predicted"]) <= 0.1 * peak["predicted"] + 6 * 2**20
