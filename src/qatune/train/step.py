"""One optimizer step: forward/backward over its micro-batches, then clip and update.

`train_step` is the unit the loop, `qatune grads`, distributed training and `qatune plan
--measure` share. The loss of every micro-batch is a *sum* over its label tokens divided by the
label-token count of the whole step — counted before any backward pass and summed over ranks — so
micro-batch x accumulation x ranks gives exactly the gradient of the large batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qatune.data.batching import Batch
from qatune.data.example import IGNORE
from qatune.train.loss import DEFAULT_CHUNK, response_loss_sum
from qatune.train.optim import ClipResult, clip_gradients

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast settings and, for fp16, the gradient scaler."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name not in DTYPES:
            raise ValueError(f"precision {name!r} is not one of {', '.join(DTYPES)}")
        self.name = name
        self.device_type = device.type
        self.dtype = DTYPES[name]
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


@dataclass
class StepStats:
    loss: float  # mean response-token loss of the step, over all micro-batches and ranks
    loss_sum: float  # local sum (this rank)
    tokens: int  # real tokens in the step, all ranks
    label_tokens: int  # label tokens in the step, all ranks
    examples: int  # examples in the step, all ranks
    prompt_loss: float | None = None  # mean loss on prompt tokens, measured (no gradient) on request
    prompt_tokens: int = 0


def prompt_targets(batch: Batch) -> torch.Tensor:
    """Shifted targets for the tokens that carry NO loss (prompt and user turns), IGNORE elsewhere.

    Position i predicts token i+1 only when both lie in the same example: positions restart at 0
    for every packed example and padding sits at position 0, so "same example" is exactly
    position_ids[i+1] == position_ids[i] + 1."""
    ids, pos, t = batch.input_ids, batch.position_ids, batch.targets
    same_doc = pos[:, 1:] == pos[:, :-1] + 1
    shifted = torch.where(same_doc & (t[:, :-1] == IGNORE), ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
    return torch.cat([shifted, torch.full_like(ids[:, :1], IGNORE)], dim=1)


def _global_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum over ranks (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _model_inputs(batch: Batch) -> dict:
    return {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "doc_ids": batch.doc_ids}


def _lm_weight(model) -> torch.Tensor:
    core = getattr(model, "module", model)  # DDP wraps; torch.compile keeps attributes reachable
    core = getattr(core, "_orig_mod", core)
    return core.wte.weight


def _device(model) -> torch.device:
    """Where the forward runs: the LM weight's device, or for FSDP (whose shards may be offloaded
    to the CPU) the device of its mesh."""
    weight = _lm_weight(model)
    mesh = getattr(weight, "device_mesh", None)
    return torch.device(mesh.device_type) if mesh is not None else weight.device


def train_step(
    model,
    micro_batches: Sequence[Batch],
    precision: Precision,
    chunk_size: int = DEFAULT_CHUNK,
    measure_prompt_loss: bool = False,
) -> StepStats:
    """Forward and backward over the micro-batches of one optimizer step; gradients accumulate in
    `.grad`. Returns the step's loss, normalized by the label tokens of the whole step.

    measure_prompt_loss: also measure the loss on the prompt tokens from the same forward pass,
    without gradient (it costs one more LM-head pass over the prompt positions)."""
    device = _device(model)
    local_labels = sum(b.n_label_tokens for b in micro_batches)
    local_tokens = sum(b.n_tokens for b in micro_batches)
    local_examples = sum(b.n_examples for b in micro_batches)
    labels, tokens, examples = _global_sum([local_labels, local_tokens, local_examples], device)
    labels = int(labels)
    loss_sum = prompt_sum = prompt_count = 0.0
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device)
        last = i == len(micro_batches) - 1
        # Under DDP, gradients are all-reduced once, on the last micro-batch of the step.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with precision.autocast():
                hidden = model(**_model_inputs(batch))
            part, _ = response_loss_sum(hidden, _lm_weight(model), batch.targets, chunk_size, precision.head_dtype)
            if measure_prompt_loss:  # before backward: FSDP reshards the root's weights after it
                with torch.no_grad():
                    ps, pn = response_loss_sum(
                        hidden, _lm_weight(model), prompt_targets(batch), chunk_size, precision.head_dtype
                    )
                prompt_sum, prompt_count = prompt_sum + float(ps), prompt_count + pn
            loss = part / max(labels, 1)
            if precision.scaler is not None:
                precision.scaler.scale(loss).backward()
            else:
                loss.backward()
        loss_sum += float(part.detach())
    global_loss_sum, prompt_sum, prompt_count = _global_sum([loss_sum, prompt_sum, prompt_count], device)
    prompt_loss = prompt_sum / prompt_count if measure_prompt_loss and prompt_count else None
    return StepStats(
        global_loss_sum / max(labels, 1), loss_sum, int(tokens), labels, int(examples), prompt_loss, int(prompt_count)
    )


@dataclass
class UpdateStats:
    lr: float  # the learning rate this update used
    grad_norm: float  # pre-clip global norm
    clipped: bool
    skipped: bool  # fp16: a non-finite gradient made the scaler skip the update


def optimizer_step(model, optimizer, scheduler, precision: Precision, grad_clip: float) -> UpdateStats:
    """Unscale (fp16), clip by global norm, update, advance the schedule, clear the gradients."""
    lr = optimizer.param_groups[0]["lr"]
    scaler = precision.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip: ClipResult = clip_gradients(model.parameters(), grad_clip)
    skipped = False
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateStats(lr, clip.grad_norm, clip.clipped, skipped)


@torch.no_grad()
def evaluate(model, batches: Sequence[Batch], precision: Precision, chunk_size: int = DEFAULT_CHUNK) -> dict:
    """Response-only loss (mean over label tokens) and perplexity on held-out batches."""
    was_training = model.training
    model.eval()
    device = _device(model)
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with precision.autocast():
            hidden = model(**_model_inputs(batch))
        part, n = response_loss_sum(hidden, _lm_weight(model), batch.targets, chunk_size, precision.head_dtype)
        total += float(part)
        count += n
    total, count = _global_sum([total, count], device)
    model.train(was_training)
    loss = total / count if count else float("nan")
    return {"eval_loss": loss, "eval_ppl": float(torch.tensor(loss).exp()), "eval_label_tokens": int(count)}
