"""The prompt-token loss a monitored SFT step measures without gradient: which prompt positions
it scores (a deterministic sample of at most one per 8 labels)."""

from __future__ import annotations

import math

import torch

from qatune.data.batching import Batch
from qatune.data.example import IGNORE


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
