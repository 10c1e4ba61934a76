"""Memory plan: model state (parameters, gradients, optimizer state, master weights), sharded per
rank, offloaded or not, full or LoRA; activations (`activations.py`); and the peak of one step.

The peak is the largest of four moments of a step, each a sum of what is alive then:
  end of forward     state + saved activations + autocast weight copies + the loss's chunk of logits
  start of backward  state + saved activations + weight copies + the loss's backward buffer
                     (+ one recomputed block under checkpointing)
  end of backward    state + all gradients + the dense embedding gradient being accumulated
  optimizer step     state + all gradients + optimizer temporaries (0 for fused AdamW)
Between the two backward moments gradients grow while activations shrink, layer by layer, both
linearly, so the maximum lies at one end. "state" is parameters + master + optimizer state; on the
first step the optimizer state exists only at the optimizer step (PyTorch creates it lazily).

Stated allowance, not modelled tensor by tensor: on CUDA the caching allocator's fragmentation
(+5% of the peak) and the CUDA context / cuBLAS workspace (+1 GiB), which
`torch.cuda.max_memory_allocated` does not count; on CPU none (large tensors are mmapped and
returned to the OS when freed).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from qatune.analysis.activations import ActivationPlan, plan_activations
from qatune.analysis.setup import OPTIMIZERS, PRECISIONS, PlanSetup
from qatune.analysis.shapes import is_gpt2, lora_matmuls
from qatune.model.info import ModelConfig, build

GiB = 1024**3
GB = 1e9
CUDA_CONTEXT = 1 * GiB
FRAGMENTATION = 0.05
ADAM_STEP_BYTES = 4  # torch.optim.AdamW keeps `step` as one fp32 scalar tensor per parameter tensor


@functools.lru_cache(maxsize=16)
def parameter_shapes(config: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter of our model of either family (built on the meta device:
    no memory; a tied head is one tensor)."""
    with torch.device("meta"):
        model = build(config)
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def block_parameters(config: ModelConfig) -> int:
    """Parameters of one block (GPT-2: 12 d^2 + 13 d), counted on block 0 of the real model."""
    return sum(math.prod(shape) for name, shape in parameter_shapes(config) if name.startswith(("h.0.", "layers.0.")))


def lora_shapes(config: ModelConfig, r: int, targets: tuple[str, ...]) -> list[tuple[int, ...]]:
    """Shapes of the LoRA factors A (r x in) and B (out x r) for each targeted matrix of each block
    (the family's target names: GPT-2's `attn.c_attn` ..., the Llama family's `q_proj` ...)."""
    fans = lora_matmuls(config, targets).values()
    return [shape for fan_in, fan_out in fans for shape in ((r, fan_in), (fan_out, r))] * config.n_layer


def shard_numel(shape: tuple[int, ...], world: int, rank: int, padded: bool = False) -> int:
    """Elements of `rank`'s dim-0 shard, as FSDP2 (`torch.chunk`) splits a tensor over `world`
    ranks; `padded`: the size FSDP2 allocates for it (every rank's shard padded to the first's)."""
    rows = shape[0] if shape else 1
    rest = math.prod(shape[1:]) if len(shape) > 1 else 1
    per = math.ceil(rows / world)
    return (per if padded else max(0, min(per, rows - rank * per))) * rest


def per_rank_state_bytes(
    config: ModelConfig,
    world_size: int,
    zero_stage: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    rank: int = 0,
    padded: bool = False,
) -> dict[str, int]:
    """Exact bytes of parameters, gradients, optimizer state and master weights that `rank` holds,
    for full fine-tuning sharded FSDP2-style (every tensor split on dim 0 with `torch.chunk`):
    stage 1 shards optimizer state and master weights, stage 2 also gradients, stage 3 also
    parameters. AdamW's per-tensor `step` scalar lives on every rank. For the distributed tests.

    padded=False counts the elements of the local shards (`DTensor.to_local().numel()`);
    padded=True the storage FSDP2 allocates for sharded parameters and gradients, each padded to
    ceil(rows / world) rows on every rank (optimizer state is built from the unpadded shards).
    Checked against a 2-process FSDP2 (`fully_shard`) run on CPU with gloo, both ways."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero stage {zero_stage} is not 0, 1, 2 or 3")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    prec, (opt_per_param, _) = PRECISIONS[precision], OPTIMIZERS[optimizer]
    out = dict.fromkeys(("params", "grads", "optimizer", "master"), 0)
    for _, shape in parameter_shapes(config):
        full = math.prod(shape)
        shard = shard_numel(shape, world_size, rank)
        alloc = shard_numel(shape, world_size, rank, padded) if world_size > 1 else full
        out["params"] += (alloc if zero_stage >= 3 else full) * prec.weight
        out["grads"] += (alloc if zero_stage >= 2 else full) * prec.grad
        held = shard if zero_stage >= 1 else full
        out["master"] += held * prec.master
        out["optimizer"] += round(held * opt_per_param) + (ADAM_STEP_BYTES if optimizer == "adamw" else 0)
    return out


@dataclass
class ModelState:
    params: int  # all parameter elements (base + LoRA)
    trainable: int
    trainable_tensors: int
    weights: int  # bytes, whole model, unsharded
    grads: int
    master: int
    optimizer: int


def model_state(s: PlanSetup) -> ModelState:
    prec, (opt_per_param, _) = s.prec, OPTIMIZERS[s.optimizer]
    base = [math.prod(shape) for _, shape in parameter_shapes(s.config)]
    lora = [math.prod(shape) for shape in lora_shapes(s.config, s.lora_r, s.lora_targets)] if s.lora_r else []
    trainable = lora if s.lora_r else base
    n_train = sum(trainable)
    step = ADAM_STEP_BYTES * len(trainable) if s.optimizer == "adamw" else 0
    return ModelState(
        params=sum(base) + sum(lora),
        trainable=n_train,
        trainable_tensors=len(trainable),
        weights=(sum(base) + sum(lora)) * prec.weight,
        grads=n_train * prec.grad,
        master=n_train * prec.master,
        optimizer=round(n_train * opt_per_param) + step,
    )


@dataclass
class MemoryPlan:
    setup: PlanSetup
    state: ModelState
    activations: ActivationPlan
    device: dict[str, int]  # per GPU (per process), bytes resident through the step
    host: dict[str, int]  # per host, offloaded bytes (all ranks of the host)
    phases: dict[str, int]  # per GPU, bytes alive at each moment of a steady-state step
    first_step_phases: dict[str, int]
    allowance: int  # stated fragmentation + context allowance (CUDA); 0 on CPU
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def first_step_peak(self) -> int:
        return max(self.first_step_phases.values())

    @property
    def total_with_allowance(self) -> int:
        return self.peak + self.allowance


def _sharded(n_bytes: int, s: PlanSetup, stage: int) -> int:
    return math.ceil(n_bytes / s.gpus) if s.zero >= stage and s.gpus > 1 else n_bytes


def _placement(s: PlanSetup, st: ModelState) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes per GPU that stay on the device, and per host that are offloaded to its memory."""
    parts = {
        "parameters": _sharded(st.weights, s, 3),
        "gradients": _sharded(st.grads, s, 2),
        "master weights": _sharded(st.master, s, 1),
        "optimizer state": _sharded(st.optimizer, s, 1),
    }
    offloaded = {"none": (), "optimizer": ("master weights", "optimizer state"), "all": tuple(parts)}[s.offload]
    if s.offload != "none" and s.zero >= 2:
        offloaded = tuple(dict.fromkeys((*offloaded, "gradients")))  # sharded fp32 grads go to the host too
    device = {k: (0 if k in offloaded else v) for k, v in parts.items()}
    ranks_per_host = min(s.gpus, 8)
    host = {k: v * ranks_per_host for k, v in parts.items() if k in offloaded}
    return device, host


def _transients(s: PlanSetup, st: ModelState) -> dict[str, int]:
    c, prec = s.config, s.prec
    block_params = block_parameters(c)
    out = {
        # Full fine-tuning: embedding backward makes a dense V x d gradient, then adds it to wte.grad.
        # An untied embedding has no other gradient: its .grad becomes that tensor, no copy
        # (measured on a 50k-vocabulary Llama: the backward's peak is 12.9 MB below the tied rule).
        "embedding gradient": c.vocab_size * c.n_embd * prec.grad if not s.lora_r and _tied(c) else 0,
        # ZeRO-3/FSDP: the current block's parameters gathered, plus the next one prefetched.
        "gathered parameters": 2 * block_params * prec.weight if s.zero >= 3 and s.gpus > 1 else 0,
        # DDP's reducer copies gradients into its buckets (gradient_as_bucket_view=False, the default).
        "DDP gradient buckets": st.grads if s.zero == 0 and s.gpus > 1 else 0,
        # Fused AdamW (qatune's default) updates in place: no temporaries.
        "optimizer temporaries": 0,
    }
    return out


def _tied(c: ModelConfig) -> bool:
    return is_gpt2(c) or c.tie_embeddings


def _phases(s, dev, acts: ActivationPlan, tr, first: bool) -> dict[str, int]:
    state = dev["parameters"] + dev["master weights"] + (0 if first else dev["optimizer state"])
    gather = tr["gathered parameters"]
    forward_end = acts.total + acts.weight_copies + acts.loss_transient
    backward_start = acts.total + acts.weight_copies_saved + acts.loss_backward + acts.recompute
    return {
        "end of forward": state + forward_end + gather,
        "start of backward": state + backward_start + gather,
        "end of backward": state + dev["gradients"] + tr["embedding gradient"] + tr["DDP gradient buckets"] + gather,
        "optimizer step": state
        + (dev["optimizer state"] if first else 0)
        + dev["gradients"]
        + tr["optimizer temporaries"],
    }


def plan_memory(s: PlanSetup) -> MemoryPlan:
    st = model_state(s)
    acts = plan_activations(s)
    device, host = _placement(s, st)
    tr = _transients(s, st)
    phases = _phases(s, device, acts, tr, first=False)
    first = _phases(s, device, acts, tr, first=True)
    peak = max(phases.values())
    allowance = round(FRAGMENTATION * peak) + CUDA_CONTEXT if s.device == "cuda" else 0
    notes = []
    if s.config.dropout > 0:
        notes.append("dropout > 0: dropout masks are not modelled, and on CPU SDPA falls back to the math kernel")
    if s.zero >= 3 and s.gpus > 1 and s.prec.autocast:
        notes.append(
            "ZeRO-3 with autocast: the 16-bit weight copies are counted for every layer, as torch.autocast keeps "
            "them for backward; FSDP2's MixedPrecisionPolicy(param_dtype=bf16) gathers 16-bit parameters per "
            "block and frees them after use instead (then about two blocks' worth)"
        )
    if s.optimizer != "adamw":
        notes.append(f"optimizer {s.optimizer}: {OPTIMIZERS[s.optimizer][1]}")
    return MemoryPlan(s, st, acts, device, host, phases, first, allowance, notes)


def fits(s: PlanSetup, capacity: int) -> bool:
    return plan_memory(s).total_with_allowance <= capacity


def largest_micro_batch(s: PlanSetup, capacity: int, limit: int = 4096) -> int:
    """The largest micro-batch whose plan fits in `capacity` bytes (0 if not even 1 fits)."""
    if not fits(s.with_(micro_batch=1), capacity):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(s.with_(micro_batch=hi), capacity):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(s.with_(micro_batch=mid), capacity) else (lo, mid)
    return lo


def advice(s: PlanSetup, capacity: int, where: str) -> list[str]:
    """What to change so the step fits in `capacity` bytes per device, in words."""
    plan = plan_memory(s)
    need = plan.total_with_allowance
    lines = []
    if need <= capacity:
        lines.append(f"fits in {where}: {need / GB:.1f} GB of {capacity / GB:.0f} GB")
        best = largest_micro_batch(s, capacity)
        if best >= s.micro_batch:
            lines.append(f"largest micro-batch that fits at seq {s.seq_len}: {best}")
        return lines
    lines.append(f"does not fit in {where}: needs {need / GB:.1f} GB, has {capacity / GB:.0f} GB")
    keep_batch = dict(micro_batch=1, accum=s.accum * s.micro_batch)  # same tokens per optimizer step
    tries = [
        ("activation checkpointing", dict(checkpointing=True)),
        ("bf16 autocast", dict(precision="bf16")),
        (f"micro-batch 1 x accum {keep_batch['accum']}", keep_batch),
        ("ZeRO-3 on 2 GPUs", dict(zero=3, gpus=max(2, s.gpus))),
        ("ZeRO-3 on 8 GPUs", dict(zero=3, gpus=max(8, s.gpus))),
        ("CPU offload of optimizer state", dict(zero=max(s.zero, 1), offload="optimizer")),
        ("LoRA r=16 on attention", dict(lora_r=16, lora_targets=("attn.c_attn", "attn.c_proj"))),
    ]
    if not is_gpt2(s.config):  # LoRA is planned for GPT-2's matrices only
        tries = tries[:-1]
    tries = [(label, change) for label, change in tries if any(getattr(s, k) != v for k, v in change.items())]
    for label, change in tries:  # one change alone
        alt = s.with_(**change)
        if fits(alt, capacity):
            lines.append(f"fits with {label}: {plan_memory(alt).total_with_allowance / GB:.1f} GB")
            return lines
    alt, labels = s, []
    for label, change in tries:  # the changes one after another, cheapest first
        alt, labels = alt.with_(**change), [*labels, label]
        if fits(alt, capacity):
            need = plan_memory(alt).total_with_allowance
            lines.append(f"fits with {' + '.join(labels)}: {need / GB:.1f} GB")
            return lines
    lines.append("does not fit even with " + " + ".join(labels))
    return lines
