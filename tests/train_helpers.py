"""Batch and log-prob helpers that only tests call, built from the runtime's own pieces (the run
plan's micro-batches, the head's `token_logprobs`), so a test can check them without a run."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qatune.data.batching import Batch
from qatune.data.example import IGNORE, EncodedExample
from qatune.data.plan import BatchConfig, RunPlan, make_batch, rank_share
from qatune.kernels.logprobs import DEFAULT_CHUNK as LOGPROB_CHUNK
from qatune.kernels.logprobs import segment_sum, token_logprobs


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
