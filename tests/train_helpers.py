"""SFT step, batch and log-prob helpers that only tests call: plain functions over batches, built
from the runtime's own pieces (`accumulate` with the SFT method's stepper, the run plan's
micro-batches, the head's `token_logprobs`), so a test can drive one step without a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qatune.data.batching import Batch
from qatune.data.example import IGNORE, EncodedExample
from qatune.train.data import BatchConfig, RunPlan, make_batch, rank_share
from qatune.train.logprobs import DEFAULT_CHUNK as LOGPROB_CHUNK
from qatune.train.logprobs import segment_sum, token_logprobs
from qatune.train.loss import DEFAULT_CHUNK
from qatune.train.step import Precision, accumulate


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


def step_batches(
    plan: RunPlan,
    step: int,
    examples: Sequence[EncodedExample],
    cfg: BatchConfig,
    max_len: int,
    pad_id: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[Batch]:
    """This rank's micro-batches of optimizer step `step`."""
    micros = rank_share(plan.steps[step], rank, world_size)
    return [make_batch([examples[i] for i in m], cfg.strategy, max_len, pad_id) for m in micros]


def labelled_rows(hidden: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor | None = None):
    """The hidden rows (N, d) and targets (N,) of the positions that carry a target (not IGNORE),
    in row-major order, plus those positions' entries of `segments` (same shape as targets) when
    given: e.g. which sequence of a packed micro-batch each scored token belongs to."""
    keep = targets != IGNORE
    rows, t = hidden[keep], targets[keep]
    return (rows, t) if segments is None else (rows, t, segments[keep])


def sequence_logprobs(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    segments: torch.Tensor,
    n_segments: int,
    chunk_size: int = LOGPROB_CHUNK,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sum of log p over the labelled positions of each segment: (n_segments,).

    hidden (B, T, d); targets (B, T) shifted, IGNORE where nothing is scored; segments (B, T) the
    segment (sequence) index of each position, any value where targets is IGNORE."""
    rows, t, seg = labelled_rows(hidden, targets, segments)
    logp = token_logprobs(rows, lm_weight, t, chunk_size, compute_dtype)
    return segment_sum(logp, seg, n_segments)
