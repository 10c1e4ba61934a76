"""`precision: auto` by measurement: bf16 where this machine's bf16 matmul is clearly faster than
its fp32 one, fp32 elsewhere.

    choose_precision("auto", torch.device("cpu"))  -> PrecisionChoice("bf16", rates={...}, ...)

On a CPU the speed of bf16 depends on instructions the device type does not tell: with AMX or
AVX512-BF16 oneDNN's bf16 matmuls run several times faster than fp32 (measured: 1,640-1,700
against 210-237 GFLOP/s on one core of a Xeon with AMX; ~450 against ~100 on an AMD EPYC with
AVX512-BF16), while on an AVX2-only CPU PyTorch emulates them through fp32 conversions (~25
against ~100 GFLOP/s on the same EPYC limited to AVX2). So a short probe times a few matmuls of a
training-like shape in each dtype (well under a second) and the result is cached per machine:
CPU model and flags, torch version and the environment variables that limit the kernels'
instruction set, under `<cache>/precision/` (cache: $QATUNE_CACHE, else $XDG_CACHE_HOME/qatune,
else ~/.cache/qatune). On CUDA: bf16 where the GPU supports it.

The probe measures one core: one torch thread, timed by that thread's CPU clock, the two dtypes
interleaved and the best of several rounds kept. On a machine other processes share, wall time
with several threads measured nonsense (2 threads, load ~9-11 on 2 cores: 9 GFLOP/s fp32, 17 bf16,
against 107 and 468 on one core), and that answer would have been cached. The bf16/fp32
ratio is the instruction set's, so one core decides for any thread count.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from qatune.utils.files import cache_root, write_text_atomic
from qatune.utils.malloc import bound_kernel_caches

# bf16 autocast adds casts and keeps LayerNorm, softmax and the optimizer in fp32, so a step gains
# far less than its matmuls do (a 7x faster bf16 matmul made a GPT-2 small step 1.8x faster on a
# Xeon with AMX): bf16 is picked only when its matmul is at least this much faster.
BF16_MIN_SPEEDUP = 2.0
# A linear layer of GPT-2 small (d=768) over 256 tokens: 0.3 GFLOP, a few ms at fp32 speed.
PROBE_SHAPE = (256, 768, 768)
PROBE_ROUNDS = 3  # fp32, bf16, fp32, bf16 …: a burst of load hits both dtypes
PROBE_SECONDS = 0.03  # per dtype and round (CPU time); an emulated bf16 call (~12 ms) still gets 2
PROBE_MAX_CALLS = 20
# Variables that cap the instruction set of ATen's, oneDNN's and MKL's kernels: the same CPU is a
# different machine for the probe under each.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
PRECISIONS = ("fp32", "bf16", "fp16")
RECORDED = "recorded by the checkpoint"


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # what the run trains in
    requested: str  # what the config said
    reason: str  # why: "set", "measured", "cached measurement", "GPU supports bf16", …
    rates: dict[str, float] = field(default_factory=dict)  # one core's matmul FLOP/s per dtype (CPU probe)
    cache_file: str | None = None

    def describe(self) -> str:
        """One line for the start of a run."""
        line = f"precision {self.requested} -> {self.precision} ({self.reason}"
        if self.rates:
            rates = ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in self.rates.items())
            line += f": one core's matmul {rates}"
            if self.precision == "fp32" and self.rates.get("bf16", 0) > 0:
                line += f"; bf16 is picked from {BF16_MIN_SPEEDUP:g}x"
        if self.cache_file:
            line += f"; cache {self.cache_file}"
        return line + ")"

    def to_json(self) -> dict:
        return asdict(self)


def choose_precision(name: str, device: torch.device, recorded: str | None = None) -> PrecisionChoice:
    """The precision a run with config value `name` trains in on `device`. `recorded`: the value a
    checkpoint being resumed saved, which an `auto` run keeps (a run does not change precision
    halfway because a probe on this machine says otherwise)."""
    if name != "auto":
        return PrecisionChoice(name, name, "set")
    if recorded in PRECISIONS:
        return PrecisionChoice(recorded, name, RECORDED)
    if recorded == "auto":  # saved unresolved, by a version whose auto meant the device type's default
        legacy = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        return PrecisionChoice(legacy, name, RECORDED + " (as auto: the device type's default when it was written)")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", name, "GPU supports bf16")
        return PrecisionChoice("fp32", name, "GPU without bf16")
    if device.type != "cpu":
        return PrecisionChoice("fp32", name, f"{device.type}: not probed")
    return cpu_choice()


@functools.cache
def cpu_choice() -> PrecisionChoice:
    """The CPU's pick, from the cache or measured now (once per process)."""
    key = machine_key()
    path = cache_root() / "precision" / f"cpu-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Locked: processes starting together on one machine (the ranks of a CPU run) measure once and
    # all read the same answer, so they cannot train in different precisions.
    with _locked(path.with_suffix(".lock")):
        rates, reason = _cached_rates(path, key), "cached measurement"
        if rates is None:
            rates, reason = measure_matmul_rates(), "measured"
            write_text_atomic(path, json.dumps({"key": key, "rates": rates}, indent=1) + "\n")
    pick = "bf16" if rates["bf16"] >= BF16_MIN_SPEEDUP * rates["fp32"] else "fp32"
    return PrecisionChoice(pick, "auto", reason, rates, str(path))


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        try:
            import fcntl  # POSIX; elsewhere two processes may both measure
        except ImportError:
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _cached_rates(path: Path, key: dict) -> dict[str, float] | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # absent or damaged: measure again
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["key"] == key:
            return {"fp32": float(saved["rates"]["fp32"]), "bf16": float(saved["rates"]["bf16"])}
    return None


def machine_key() -> dict:
    """What the probe's answer depends on."""
    model, flags = platform.processor(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "model name" and not flags:
                model = v.strip()
            elif k.strip() == "flags":
                flags = " ".join(sorted(v.split()))
                break
    env = {v: os.environ[v] for v in ISA_ENV if v in os.environ}
    return {"cpu": model, "flags": flags, "torch": torch.__version__, "env": env}


def measure_matmul_rates() -> dict[str, float]:
    """FLOP/s of one core on `PROBE_SHAPE` linear layers in fp32 and in bf16: the best of
    `PROBE_ROUNDS` interleaved rounds, on one torch thread, in this thread's CPU time."""
    bound_kernel_caches()  # the first bf16 matmul sizes oneDNN's caches: the run's cap, not the default
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        m, k, n = PROBE_SHAPE
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        operands = {"fp32": (x, w), "bf16": (x.bfloat16(), w.bfloat16())}
        best = dict.fromkeys(operands, 0.0)
        for _ in range(PROBE_ROUNDS):
            for name, (a, b) in operands.items():
                best[name] = max(best[name], _linear_rate(a, b))
        return best
    finally:
        torch.set_num_threads(threads)


def _linear_rate(x: torch.Tensor, w: torch.Tensor) -> float:
    F.linear(x, w)  # kernel selection and weight packing happen on a first call
    calls, t0 = 0, time.thread_time()
    while True:
        F.linear(x, w)
        calls += 1
        elapsed = time.thread_time() - t0
        if (elapsed >= PROBE_SECONDS and calls >= 2) or calls >= PROBE_MAX_CALLS:
            return 2 * x.shape[0] * x.shape[1] * w.shape[0] * calls / max(elapsed, 1e-9)
