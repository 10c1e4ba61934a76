"""One real training step of a plan's configuration, measured the way the plan predicts it.

`measure_step` builds the model (random weights of the planned shape), a synthetic batch with the
planned number of label positions, and runs the training step itself: the runtime's `accumulate`
with the SFT step (forward, chunked response-only loss, backward), then `optimizer_step` (clip,
qatune's AdamW: decay groups, fused). It reports:
- parameter / gradient / optimizer bytes summed over the real tensors (storages counted once),
- activation bytes: every tensor autograd saves during forward and loss, caught with
  `torch.autograd.graph.saved_tensors_hooks`, storages deduplicated, parameters excluded, the
  autocast weight copies counted on their own line,
- FLOPs of forward + backward from `torch.utils.flop_counter.FlopCounterMode`,
- the step's wall time, and the peak: `torch.cuda.max_memory_allocated` on GPU, on CPU the
  process's peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the model
  was built. For a clean CPU peak, `measure_in_subprocess` runs the step in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from qatune.analysis.setup import PlanSetup
from qatune.analysis.shapes import attention_width, is_gpt2
from qatune.data.batching import Batch
from qatune.data.example import IGNORE
from qatune.errors import UserError
from qatune.methods.sft import SFT
from qatune.model.gpt2 import GPT2Config
from qatune.model.info import build
from qatune.model.llama import LlamaConfig, Rope
from qatune.model.lora import LoRAConfig, apply_lora
from qatune.train.optim import OptimConfig, build_optimizer
from qatune.train.step import Precision, accumulate, optimizer_step

MEASURABLE_PRECISIONS = ("fp32", "bf16", "fp16")  # what training runs: fp32 weights, optional autocast


@dataclass
class Measurement:
    device: str
    params: int
    grads: int
    optimizer: int
    activations: int  # saved by forward + loss, without parameters and autocast weight copies
    activations_model: int  # of which saved by the model's forward
    activations_loss: int  # of which saved by the loss
    weight_copies: int
    flops: int  # forward + backward, as counted by FlopCounterMode
    # How the counter saw attention: "math" (bmm's), "fused" (flash/efficient kernels, backward
    # counted with its QK^T recompute), "none" (CPU flash: no formula, counted as 0; the 16-bit CPU
    # matmul kernel of packed rows: its bmm's taken out, to compare like CPU flash).
    attention_counted: str
    step_seconds: float  # forward + loss + backward + optimizer step
    optimizer_seconds: float
    peak: int | None  # bytes above the pre-model baseline
    peak_source: str


def _rss_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _storage_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def synthetic_batch(s: PlanSetup, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids; in each row the last positions carry labels, `s.label_tokens` in all.
    Packed plans put two documents in each row (positions restart, block-causal mask)."""
    g = torch.Generator().manual_seed(seed)
    B, T = s.micro_batch, s.seq_len
    ids = torch.randint(0, s.config.vocab_size, (B, T), generator=g)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    per_row = [s.label_tokens // B + (r < s.label_tokens % B) for r in range(B)]
    for r, k in enumerate(per_row):
        if k:
            targets[r, T - k :] = torch.randint(0, s.config.vocab_size, (k,), generator=g)
    if s.packed:
        half = T // 2
        doc_ids = (torch.arange(T) >= half).long().expand(B, T).contiguous()
        position_ids = torch.cat([torch.arange(half), torch.arange(T - half)]).expand(B, T).contiguous()
    else:
        doc_ids = None
        position_ids = torch.arange(T).expand(B, T).contiguous()
    return {"input_ids": ids, "position_ids": position_ids, "doc_ids": doc_ids, "targets": targets}


def _as_batch(tensors: dict[str, torch.Tensor], s: PlanSetup) -> Batch:
    ids = tensors["input_ids"]
    return Batch(
        ids, tensors["targets"], tensors["position_ids"], tensors["doc_ids"], ids.shape[0], ids.numel(), s.label_tokens
    )


class WeightCasts(TorchDispatchMode):
    """Notes every tensor made from parameters by a cast (`_to_copy`) or by stacking (`cat`) of
    parameters or such copies: autocast's 16-bit weight copies, of trained and of frozen weights
    alike (a frozen LoRA base weight's copy has no autograd history to follow back), the stacked
    q/k/v and gate/up weights (`llama.stacked_linear`). Views of them share their storage. Held
    by weak reference: a freed copy's address can come back as an activation's."""

    _MAKERS = (torch.ops.aten._to_copy.default, torch.ops.aten.cat.default)

    def __init__(self, params) -> None:
        super().__init__()
        self.sources = {p.untyped_storage().data_ptr() for p in params}
        self.made: dict[int, weakref.ref] = {}

    def is_copy(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        ref = self.made.get(ptr)
        made = ref() if ref is not None else None
        return made is not None and made.untyped_storage().data_ptr() == ptr

    def _from_weights(self, t) -> bool:
        if isinstance(t, (list, tuple)):
            return len(t) > 0 and all(self._from_weights(x) for x in t)
        return isinstance(t, torch.Tensor) and (t.untyped_storage().data_ptr() in self.sources or self.is_copy(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self._MAKERS and isinstance(out, torch.Tensor) and self._from_weights(args[0]):
            self.made[out.untyped_storage().data_ptr()] = weakref.ref(out)
        return out


class SavedTensorLedger:
    """Counts the storages autograd saves, by category, without keeping them alive; the weight
    copies among them are what `WeightCasts` saw made from the parameters."""

    def __init__(self, params) -> None:
        params = list(params)
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.casts = WeightCasts(params)
        self.seen: dict[int, tuple[str, int]] = {}
        self.phase = "model"

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.param_ptrs and ptr not in self.seen:
            self.seen[ptr] = ("weight copies" if self.casts.is_copy(t) else self.phase, st.nbytes())
        return t

    def total(self, category: str) -> int:
        return sum(n for c, n in self.seen.values() if c == category)

    @contextlib.contextmanager
    def hooks(self):
        """Record what autograd saves, and the weight copies made, while the step runs."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t), self.casts:
            yield

    def follow(self, model: torch.nn.Module) -> None:
        """What is saved while `model`'s forward runs counts as "model", what is saved after it
        (the loss) as "loss"."""
        model.register_forward_pre_hook(lambda *_: setattr(self, "phase", "model"))
        model.register_forward_hook(lambda *_: setattr(self, "phase", "loss"))


def _check_measurable(s: PlanSetup) -> None:
    problems = []
    if s.precision not in MEASURABLE_PRECISIONS:
        problems.append(f"precision {s.precision} (qatune trains with fp32 weights: fp32, bf16 or fp16 autocast)")
    if s.gpus > 1 or s.zero or s.offload != "none":
        problems.append("several ranks, ZeRO or offload (a one-process step; the distributed tests check those)")
    if s.loss != "chunked":
        problems.append("full logits (qatune trains with the chunked loss)")
    if s.optimizer != "adamw":
        problems.append(f"optimizer {s.optimizer} (qatune trains with AdamW)")
    if problems:
        raise UserError("--measure cannot run: " + "; ".join(problems))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(s: PlanSetup, seed: int = 0, count_flops: bool = True) -> Measurement:
    """Run one training step of plan `s` on `s.device` and measure it (see the module docstring)."""
    _check_measurable(s)
    device = torch.device(s.device)
    batch = _as_batch(synthetic_batch(s, seed), s).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base, peak_source = torch.cuda.memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak_source = "peak RSS (VmHWM) delta" if _reset_peak_rss() else "unavailable"
        base = _rss_kb("VmRSS") * 1024

    torch.manual_seed(seed)
    model = build(s.config).to(device)
    if s.lora_r:  # as the runtime does it: base frozen, adapters on the planned targets
        apply_lora(model, LoRAConfig(r=s.lora_r, targets=list(s.lora_targets)))
    model.train()
    model.activation_checkpointing = s.checkpointing
    optimizer = build_optimizer(model, OptimConfig())
    precision = Precision(s.precision, device)
    ledger = SavedTensorLedger(model.parameters())
    ledger.follow(model)
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    kernel = sdpa_kernel(SDPBackend.MATH) if s.attention == "math" else contextlib.nullcontext()

    # The step training runs (`accumulate` with the SFT step, then `optimizer_step`), timed in two parts.
    _sync(device)
    start = time.perf_counter()
    with counter, kernel, ledger.hooks():
        accumulate(model, SFT.stepper(), [batch], precision)
    grads = _storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    _sync(device)
    opt_start = time.perf_counter()
    optimizer_step(model, optimizer, None, precision, OptimConfig().grad_clip)
    _sync(device)
    end = time.perf_counter()

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _rss_kb("VmHWM") * 1024 - base if peak_source != "unavailable" else None
    flops = counter.get_total_flops() if count_flops else 0
    counts = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()} if count_flops else {}
    fused = any("scaled_dot_product" in op for op in counts)
    attention_counted = "fused" if fused else "math" if any("bmm" in op for op in counts) else "none"
    if attention_counted == "math" and s.packed and s.attention != "math" and device.type == "cpu" and s.prec.act == 2:
        # 16-bit packed rows on CPU attend by the matmul kernel (`model.attention.matmul_attention`):
        # its bmm's, over each document's square and with a recompute, are left out like CPU flash
        flops -= sum(n for op, n in counts.items() if "bmm" in op)
        attention_counted = "none"
    return Measurement(
        device=str(device),
        params=_storage_bytes(model.parameters()),
        grads=grads,
        optimizer=optimizer_state_bytes(optimizer),
        activations=ledger.total("model") + ledger.total("loss"),
        activations_model=ledger.total("model"),
        activations_loss=ledger.total("loss"),
        weight_copies=ledger.total("weight copies"),
        flops=flops,
        attention_counted=attention_counted,
        step_seconds=end - start,
        optimizer_seconds=end - opt_start,
        peak=peak,
        peak_source=peak_source,
    )


def calibrate(
    device: torch.device, dtype: torch.dtype | None, d: int, rows: int, adam_numel: int = 1 << 24, reps: int = 3
) -> dict[str, float]:
    """This device's achieved matmul FLOP/s (a rows x d x 4d GEMM, like the MLP's) and copy
    bandwidth (bytes read + written per second): the "peak" a step-time estimate uses here."""
    dtype = dtype or torch.float32
    a = torch.randn(rows, d, device=device, dtype=dtype)
    b = torch.randn(d, 4 * d, device=device, dtype=dtype)
    a @ b  # warm-up (threads, kernels)
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    gemm = 2 * rows * d * 4 * d * reps / (time.perf_counter() - t)
    src = torch.empty(32 * 1024 * 1024, device=device)  # 128 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    bandwidth = 2 * src.nbytes * reps / (time.perf_counter() - t)
    return {
        "matmul_flops_per_s": gemm,
        "copy_bytes_per_s": bandwidth,
        "adamw_params_per_s": _adamw_rate(device, adam_numel),
    }


def _adamw_rate(device: torch.device, numel: int) -> float:
    """Parameters per second of qatune's AdamW's FIRST step (fused where it can be; the step
    `measure_step` times is a first step, so it includes creating the moments). Memory-bound and,
    on CPU, far below the copy bandwidth, so it is timed, not derived."""
    p = torch.nn.Parameter(torch.zeros(numel, device=device))
    p.grad = torch.randn_like(p)
    optimizer = build_optimizer(torch.nn.ParameterList([p]), OptimConfig())
    _sync(device)
    t = time.perf_counter()
    optimizer.step()
    _sync(device)
    return numel / (time.perf_counter() - t)


def estimate_step_seconds(hardware_flops: int, trainable: int, rates: dict[str, float]) -> float:
    """Forward + backward at the calibrated matmul rate, plus AdamW at its calibrated rate."""
    return hardware_flops / rates["matmul_flops_per_s"] + trainable / rates["adamw_params_per_s"]


# --- running the step in a fresh interpreter (clean peak RSS) ---------------------------------


def setup_to_json(s: PlanSetup) -> str:
    d = {f.name: getattr(s, f.name) for f in fields(s)}
    d["config"] = {"family": "gpt2" if is_gpt2(s.config) else "llama", **s.config.to_dict()}
    d["lora_targets"] = list(s.lora_targets)
    return json.dumps(d)


def config_from_dict(d: dict) -> GPT2Config | LlamaConfig:
    """The inverse of `setup_to_json`'s config: its family, the Llama family's rope and eos ids."""
    d = dict(d)
    if d.pop("family", "gpt2") == "gpt2":
        return GPT2Config(**d)
    eos = d.get("eos_token_id")
    return LlamaConfig(**{**d, "rope": Rope(**d["rope"]), "eos_token_id": tuple(eos) if isinstance(eos, list) else eos})


def setup_from_json(text: str) -> PlanSetup:
    d = json.loads(text)
    d["config"] = config_from_dict(d["config"])
    d["lora_targets"] = tuple(d["lora_targets"])
    return PlanSetup(**d)


# glibc raises its mmap threshold up to 32 MB as large blocks are freed, then keeps freed
# activations in its heap: measured at gpt2 seq 512, ~250 MB stays in RSS after backward (+13% on
# the peak). A fixed 128 KiB threshold mmaps every tensor-sized block and unmaps it when freed, so
# the peak RSS tracks live tensors.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_in_subprocess(
    s: PlanSetup, count_flops: bool = True, timeout: float | None = None, env: dict | None = None
) -> Measurement:
    """`measure_step` in a fresh Python process: nothing of this process's memory in its peak."""
    cmd = [sys.executable, "-m", "qatune.analysis.measure", setup_to_json(s)]
    if not count_flops:
        cmd.append("--no-flops")
    environment = {**os.environ, **(MEASURE_ENV if env is None else env)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def warm_up_setup(s: PlanSetup) -> PlanSetup:
    """The same step on a 1-layer, 64-wide model. A process's first training step also pays for
    first use: kernel code paged in, thread pools, allocator arenas. Measured on CPU: ~100-150 MB
    of RSS (a tiny model's first step peaked at 150 MB, its second at 49 MB; gpt2 at seq 256 x 4
    was 150 MB above the plan with or without LoRA), whatever the model's size. The plan counts
    tensors (as `torch.cuda.max_memory_allocated` does), so the subprocess runs this first."""
    if is_gpt2(s.config):
        tiny = GPT2Config(1, 64, 4, n_positions=s.config.n_positions, vocab_size=s.config.vocab_size)
    else:  # the same switches (biases, q/k norms, tied head), a tiny shape
        tiny = replace(s.config, n_layer=1, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, d_ff=128)
    return s.with_(config=tiny, micro_batch=1, seq_len=min(s.seq_len, 64))


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="measure one training step of a plan (internal)")
    p.add_argument("setup_json")
    p.add_argument("--no-flops", action="store_true")
    args = p.parse_args(argv)
    s = setup_from_json(args.setup_json)
    measure_step(warm_up_setup(s), count_flops=False)
    m = measure_step(s, count_flops=not args.no_flops)
    print(json.dumps(asdict(m)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())


def compare(s: PlanSetup, m: Measurement, rates: dict[str, float] | None = None) -> list[dict]:
    """Predicted vs measured, one row per component: {name, predicted, measured, ratio, unit}."""
    from qatune.analysis.compute import plan_compute
    from qatune.analysis.memory import plan_memory

    plan, compute = plan_memory(s), plan_compute(s)
    c = s.config
    width = attention_width(c)  # d for GPT-2
    attention = compute.attention + (4 * c.n_layer * s.seq_len * width * s.tokens if s.checkpointing else 0)
    # The counter's view of attention: math kernel = our 12*L*T*d; fused kernels add the backward's
    # QK^T recompute (14*L*T*d); CPU flash = nothing.
    seen = {"math": attention, "fused": attention + 2 * c.n_layer * s.seq_len * width * s.tokens, "none": 0}
    flops = compute.hardware_flops - attention + seen[m.attention_counted]
    rows = [
        ("parameters", plan.state.weights, m.params, "bytes"),
        ("gradients", plan.state.grads, m.grads, "bytes"),
        ("optimizer state", plan.state.optimizer, m.optimizer, "bytes"),
        ("activations saved (model)", plan.activations.total - sum(_loss_parts(plan)), m.activations_model, "bytes"),
        ("activations saved (loss)", sum(_loss_parts(plan)), m.activations_loss, "bytes"),
        ("autocast weight copies", plan.activations.weight_copies_saved, m.weight_copies, "bytes"),
        ("peak, first step", plan.first_step_peak, m.peak, "bytes"),
        (
            "FLOPs fwd+bwd" + (" (no attention: CPU flash uncounted)" if m.attention_counted == "none" else ""),
            flops,
            m.flops,
            "FLOP",
        ),
    ]
    if rates is not None:
        estimate = estimate_step_seconds(compute.hardware_flops, plan.state.trainable, rates)
        rows.append(("step time", estimate, m.step_seconds, "s"))
    out = []
    for name, predicted, measured, unit in rows:
        if predicted == 0 and not measured:
            continue
        ratio = measured / predicted if predicted and measured is not None else None
        out.append({"name": name, "predicted": predicted, "measured": measured, "ratio": ratio, "unit": unit})
    return out


def _loss_parts(plan) -> list[int]:
    return [v for k, v in plan.activations.saved.items() if k.startswith("loss")]
