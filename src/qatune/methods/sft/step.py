"""The SFT step as plain functions over batches, for callers that hold batches rather than a run:
`qatune grads`, tests and benchmarks (monitor_cost.py steps, sft_vs_trl.py scores). The same
`accumulate` and `evaluate_sums` as a run, with the SFT method's step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qatune.data.batching import Batch
from qatune.kernels.loss import DEFAULT_CHUNK
from qatune.methods.sft.method import SFT, lm_eval_metrics
from qatune.train.step import Precision, accumulate, evaluate_sums


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
    """The SFT step (`qatune.methods.sft.SFT.step`) accumulated over `micro_batches`.

    measure_prompt_loss: also measure the loss on the prompt tokens from the same forward pass,
    without gradient (it costs one more LM-head pass over the prompt positions)."""
    t = accumulate(model, SFT.stepper(chunk_size), micro_batches, precision, monitor=measure_prompt_loss)
    n_prompt = int(t.totals.get("prompt_tokens", 0))
    prompt_loss = t.totals["prompt_loss_sum"] / n_prompt if measure_prompt_loss and n_prompt else None
    return StepStats(t.loss, t.loss_sum, t.tokens, t.count, t.examples, prompt_loss, n_prompt)


@torch.no_grad()
def evaluate(model, batches: Sequence[Batch], precision: Precision, chunk_size: int = DEFAULT_CHUNK) -> dict:
    """Response-only loss (mean over label tokens) and perplexity on held-out batches."""
    loss_sum, count, _ = evaluate_sums(model, SFT.stepper(chunk_size), batches, precision)
    return lm_eval_metrics(loss_sum, count)
