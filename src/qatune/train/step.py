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
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from qatune.data.batching import Batch
from qatune.data.example import IGNORE
from qatune.kernels.loss import DEFAULT_CHUNK
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


def backbone(model):
    """The GPT-2 inside whatever wraps it: DDP (`module`), torch.compile (`_orig_mod`), a method's
    head wrapper (`backbone`)."""
    for attr in ("module", "_orig_mod", "backbone"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return backbone(inner)
    return model


def lm_weight(model) -> torch.Tensor:
    """The tied LM head / token embedding of the GPT-2 in `model`."""
    return backbone(model).wte.weight


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


# --- supervised fine-tuning through the shared step, as plain functions for callers that hold
# batches, not a run: tests and benchmarks (monitor_cost.py steps, sft_vs_trl.py scores) -----


@dataclass
class StepStats:
    loss: float  # mean response-token loss of the step, over all micro-batches and ranks
    loss_sum: float  # local sum (this rank)
    tokens: int  # real tokens in the step, all ranks
    label_tokens: int  # label tokens in the step, all ranks
    examples: int  # examples in the step, all ranks
    prompt_loss: float | None = None  # mean loss on prompt tokens, measured (no gradient) on request
    prompt_tokens: int = 0


def train_step(
    model,
    micro_batches: Sequence[Batch],
    precision: Precision,
    chunk_size: int = DEFAULT_CHUNK,
    measure_prompt_loss: bool = False,
) -> StepStats:
    """The SFT step (`qatune.train.methods.sft.SFT.step`) accumulated over `micro_batches`.

    measure_prompt_loss: also measure the loss on the prompt tokens from the same forward pass,
    without gradient (it costs one more LM-head pass over the prompt positions)."""
    from qatune.train.methods.sft import SFT

    t = accumulate(model, SFT.stepper(chunk_size), micro_batches, precision, monitor=measure_prompt_loss)
    n_prompt = int(t.totals.get("prompt_tokens", 0))
    prompt_loss = t.totals["prompt_loss_sum"] / n_prompt if measure_prompt_loss and n_prompt else None
    return StepStats(t.loss, t.loss_sum, t.tokens, t.count, t.examples, prompt_loss, n_prompt)


@torch.no_grad()
def evaluate(model, batches: Sequence[Batch], precision: Precision, chunk_size: int = DEFAULT_CHUNK) -> dict:
    """Response-only loss (mean over label tokens) and perplexity on held-out batches."""
    from qatune.train.methods.sft import SFT, lm_eval_metrics

    loss_sum, count, _ = evaluate_sums(model, SFT.stepper(chunk_size), batches, precision)
    return lm_eval_metrics(loss_sum, count)


def prompt_targets(batch: Batch) -> torch.Tensor:
    """Shifted targets for the tokens that carry NO loss (prompt and user turns), IGNORE elsewhere.

    Position i predicts token i+1 only when both lie in the same example: positions restart at 0
    for every packed example and padding sits at position 0, so "same example" is exactly
    position_ids[i+1] == position_ids[i] + 1."""
    ids, pos, t = batch.input_ids, batch.position_ids, batch.targets
    same_doc = pos[:, 1:] == pos[:, :-1] + 1
    shifted = torch.where(same_doc & (t[:, :-1] == IGNORE), ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
    return torch.cat([shifted, torch.full_like(ids[:, :1], IGNORE)], dim=1)


def sample_targets(targets: torch.Tensor, every: int) -> torch.Tensor:
    """Every `every`-th scored position of `targets` (reading order) kept, the others IGNORE.

    A systematic sample: deterministic and drawing no random numbers, so a resumed run measures
    the same positions and the training RNG stream is untouched."""
    if every <= 1:
        return targets
    scored = targets != IGNORE
    rank = scored.flatten().cumsum(0).view_as(targets) - 1
    return torch.where(scored & (rank % every == 0), targets, torch.full_like(targets, IGNORE))


# A monitored step scores at most one prompt position per this many labels. The prompt rows cost
# forward only, but the LM head's full-vocabulary pass makes each one about a third of a label's
# head cost, at a worse matmul efficiency (few rows). With the per-layer norms, monitoring every
# step measured 1.033x the step's CPU time at one per 8 and ~1.05x at one per 4
# (benchmarks/monitor_cost.py, paired).
MONITOR_LABELS_PER_PROMPT = 8


def monitor_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt positions a monitored step scores (flat positions into B*T) and their targets:
    all of them when there are at most an eighth as many as the batch has labels, else every m-th
    one in reading order (a systematic sample spread over every document).

    The model's last block computes exactly the positions asked for
    (`qatune.model.gpt2.LastBlockRows`), so the sample adds its own rows there and no more.
    Drawing no random numbers keeps a resumed run's sample, and its training RNG stream, the
    same."""
    targets = prompt_targets(batch).flatten()
    limit = max(batch.count // MONITOR_LABELS_PER_PROMPT, 1)
    n = int((targets != IGNORE).sum())
    sampled = sample_targets(targets, math.ceil(n / limit))  # every <= 1 (n <= limit): all of them
    index = (sampled != IGNORE).nonzero().flatten()
    return index, targets.index_select(0, index)


def compiled(model) -> bool:
    """Whether `model`, or a module it wraps, runs under torch.compile."""
    if hasattr(model, "_orig_mod"):
        return True
    inner = [getattr(model, a, None) for a in ("module", "backbone")]
    return any(isinstance(m, torch.nn.Module) and compiled(m) for m in inner)


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


def perplexity(loss: float) -> float:
    return math.inf if loss > 709 else math.exp(loss)  # exp overflows a double past ~709.78; nan stays nan
