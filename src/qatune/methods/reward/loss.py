"""The reward model's loss and metrics, on the scores of chosen and rejected responses.

Reward model: Bradley-Terry, -log sigma(s_w - s_l - m) with an optional margin m per pair, plus
TRL's optional centering term c (s_w + s_l)^2 (Eisenstein et al. 2023) that keeps scores near 0.

The scalar head reads each response's last token (before its EOS). Every function returns
per-pair values or SUMS over the pairs, so that micro-batches, accumulation and ranks add up and
the runtime divides once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qatune.data.preference.batching import PairBatch
from qatune.errors import UserError


@dataclass
class RewardConfig:
    center_coefficient: float = 0.0  # c in c (s_w + s_l)^2; TRL recommends 0.01 when used
    use_margin: bool = True  # subtract the data's per-pair `margin` field (0 where a pair has none)

    def __post_init__(self) -> None:
        if self.center_coefficient < 0:
            raise UserError(f"reward.center_coefficient must be >= 0, got {self.center_coefficient}")


def bradley_terry_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, center: float = 0.0
) -> torch.Tensor:
    """Per-pair reward-model losses (P,) from the scores (P,) of chosen and rejected responses."""
    diff = chosen - rejected if margin is None else chosen - rejected - margin
    loss = -F.logsigmoid(diff)
    if center:
        loss = loss + center * (chosen + rejected) ** 2
    return loss


def reward_metric_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    scores = torch.cat([chosen, rejected])
    return {
        "accuracy": (chosen > rejected).float().sum(),
        "margin": (chosen - rejected).sum(),
        "score_chosen": chosen.sum(),
        "score_rejected": rejected.sum(),
        "score_sq": (scores**2).sum() / 2,  # per pair, for the spread of the scores
    }


def reward_summary(totals: dict[str, float], pairs: int) -> dict[str, float]:
    out = {k: v / pairs for k, v in totals.items() if k != "score_sq"}
    if "score_sq" in totals:
        mean = (totals["score_chosen"] + totals["score_rejected"]) / (2 * pairs)
        out["score_std"] = max(0.0, totals["score_sq"] / pairs - mean * mean) ** 0.5
    return out


def reward_loss_sum(
    scores: torch.Tensor, batch: PairBatch, cfg: RewardConfig, use_margin: bool = True
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of the per-pair Bradley-Terry losses, metric sums) from the scores (2P,) of `batch`."""
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    chosen, rejected = scores[0::2], scores[1::2]
    margin = batch.margins.to(scores.device, scores.dtype) if use_margin else None
    loss = bradley_terry_losses(chosen, rejected, margin, cfg.center_coefficient).sum()
    return loss, reward_metric_sums(chosen, rejected)
