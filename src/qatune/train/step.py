"""One optimizer step: forward/backward over its micro-batches, then clip and update.

`accumulate` runs any method's step over the micro-batches of one optimizer step and is the unit
the runtime, `qatune grads`, `qatune plan --measure` and distributed training share. Each
micro-batch's loss is a *sum* over its units (label tokens, pairs …) divided by the unit count of
the whole step — summed from the batch plan before any backward pass, and over ranks — so
micro-batch x accumulation x ranks gives exactly the gradient of the large batch.

Nothing here waits for the device between micro-batches: counts come from the batches (known
when they were collated), and the step's losses and metrics stay on the device until one
transfer at the end of the step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from qatune.model.unwrap import backbone, compiled
from qatune.train.distributed import deal_eval_batches, rank_and_world
from qatune.train.optim import ClipResult, clip_gradients, finish_clip
from qatune.utils.device import dtype_of


class Precision:
    """Autocast settings and, for fp16, the gradient scaler."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.dtype = dtype_of(name)
        self.name = name
        self.device_type = device.type
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    @property
    def head_dtype(self) -> torch.dtype | None:
        """The LM head's matmul dtype: the autocast dtype, or (fp32) the weights' own dtype."""
        return None if self.name == "fp32" else self.dtype

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


class PhaseClock:
    """While active (`with PhaseClock() as clock`), the wall and CPU seconds of this thread spent
    in each `phase`: a per-phase profile of a training run at almost no cost, and on a machine
    shared with other processes the CPU seconds stay the step's own."""

    active: PhaseClock | None = None

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __enter__(self) -> PhaseClock:
        PhaseClock.active = self
        return self

    def __exit__(self, *exc) -> None:
        PhaseClock.active = None

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu


@contextlib.contextmanager
def phase(name: str):
    """A named span of a training step (data, forward, loss, backward, optimizer, monitor,
    logging, eval, checkpoint): a torch.profiler range, and timed when a PhaseClock is active."""
    clock = PhaseClock.active
    wall, cpu = time.perf_counter(), time.thread_time()
    # record_function costs tens of microseconds even with no profiler: only under one
    with torch.profiler.record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext():
        yield
    if clock is not None:
        clock.add(name, time.perf_counter() - wall, time.thread_time() - cpu)


def lm_weight(model) -> torch.Tensor:
    """The output head's (vocab, d) weight of the model in `model` (the token embedding when tied)."""
    return backbone(model).head_weight


def model_device(model) -> torch.device:
    """Where the forward runs: the LM weight's device, or for FSDP (whose shards may be offloaded
    to the CPU) the device of its mesh."""
    weight = lm_weight(model)
    mesh = getattr(weight, "device_mesh", None)
    return torch.device(mesh.device_type) if mesh is not None else weight.device


def global_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (identity in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


def _global_sum(values: list[float], device: torch.device) -> list[float]:
    return global_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def _grad_sync(model, last: bool):
    """Reduce gradients over ranks only on the last micro-batch of a step: DDP's `no_sync` on the
    others; FSDP2 keeps unsharded gradients across micro-batches and reduce-scatters once."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2's FSDPModule
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


@dataclass
class StepTotals:
    loss: float  # the step's loss: global loss sum / global count
    loss_sum: float  # this rank's loss sum
    count: int  # units of the whole step, all ranks
    tokens: int  # real tokens in the step, all ranks
    examples: int  # examples in the step, all ranks
    totals: dict[str, float] = field(default_factory=dict)  # the method's metrics, summed over everything


def _add(sums: dict, metrics: dict) -> None:
    for k, v in metrics.items():
        v = v.detach() if torch.is_tensor(v) else v
        sums[k] = sums[k] + v if k in sums else v


def _reduce(local: list, device: torch.device) -> list[float]:
    """One device->host transfer (and one all-reduce) for every number the step logs."""
    parts = [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(1) for v in local]
    return global_sum(torch.cat(parts)).tolist()


def accumulate(model, method, micro_batches: Sequence, precision: Precision, monitor: bool = False) -> StepTotals:
    """Forward and backward of `method.step` over the micro-batches of one optimizer step;
    gradients accumulate in `.grad`, normalized by the count of the whole step."""
    device = model_device(model)
    local = [sum(b.count for b in micro_batches), sum(b.n_tokens for b in micro_batches)]
    local.append(sum(b.n_examples for b in micro_batches))
    count, tokens, examples = (int(x) for x in _global_sum(local, device))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    sums: dict = {}
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device)
        with _grad_sync(model, last=i == len(micro_batches) - 1):
            with precision.autocast():
                out = method.step(model, batch, monitor=monitor)
            loss = out.loss_sum / max(count, 1)
            with phase("backward"):
                (precision.scaler.scale(loss) if precision.scaler is not None else loss).backward()
        loss_sum += out.loss_sum.detach()
        _add(sums, out.metrics)
    names = sorted(sums)
    reduced = _reduce([loss_sum, *[sums[n] for n in names]], device)
    local_sum = float(loss_sum)
    return StepTotals(reduced[0] / max(count, 1), local_sum, count, tokens, examples, dict(zip(names, reduced[1:])))


@torch.no_grad()
def evaluate_sums(model, method, batches: Sequence, precision: Precision) -> tuple[float, int, dict[str, float]]:
    """(loss sum, count, summed metrics) of `method.step` over held-out batches, all ranks.

    Each rank takes every world_size-th batch (`deal_eval_batches`)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count, sums = 0, {}
    for batch, counted in deal_eval_batches(batches, *rank_and_world()):
        with precision.autocast():
            out = method.step(model, batch.to(device))
        if counted:
            loss_sum += out.loss_sum.detach()
            count += out.count
            _add(sums, out.metrics)
        else:  # zeros, so that every rank all-reduces the same metric names
            _add(sums, {k: torch.zeros_like(v) if torch.is_tensor(v) else 0.0 for k, v in out.metrics.items()})
    model.train(was_training)
    names = sorted(sums)
    reduced = _reduce([loss_sum, count, *[sums[n] for n in names]], device)
    return reduced[0], int(reduced[1]), dict(zip(names, reduced[2:]))


@dataclass
class UpdateStats:
    lr: float  # the learning rate this update used
    grad_norm: float  # pre-clip global norm
    clipped: bool
    skipped: bool  # fp16: a non-finite gradient made the scaler skip the update


def optimizer_step(model, optimizer, scheduler, precision: Precision, grad_clip: float) -> UpdateStats:
    """Unscale (fp16), clip by global norm, update, advance the schedule, clear the gradients."""
    with phase("optimizer"):
        return _optimizer_step(model, optimizer, scheduler, precision, grad_clip)


def _optimizer_step(model, optimizer, scheduler, precision: Precision, grad_clip: float) -> UpdateStats:
    lr = optimizer.param_groups[0]["lr"]
    scaler = precision.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    # fp16: GradScaler sets the fused optimizer's grad_scale itself, so the clip factor is not
    # folded into it there
    clip: ClipResult = clip_gradients(model.parameters(), grad_clip, optimizer if scaler is None else None)
    skipped = False
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale
    else:
        optimizer.step()
        finish_clip(optimizer)
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateStats(lr, clip.grad_norm, clip.clipped, skipped)


def scored_rows_only(model, index: torch.Tensor | None, tied_head: bool = True) -> dict:
    """The forward's keyword arguments for a step that reads the hidden states at `index` only
    (flat positions): `outputs` (the model then returns just those rows, its last block cut to
    them) and, when the loss also runs the tied LM head, a sparse token-embedding gradient
    (no zero-filled vocab x d buffer). It pays where the head's loss then writes its weight
    gradient into `.grad` (`weight_grad_into_grad=True`: SFT, DPO, PPO/GRPO); returned through
    autograd, the dense + sparse sum is a fresh vocab x d copy (measured by
    benchmarks/embedding_grad.py; numbers in docs/performance.md). Nothing under
    torch.compile, whose graph would change with every batch's rows."""
    if index is None or compiled(model):
        return {}
    return {"outputs": index, "sparse_embedding_grad": tied_head}
