"""DPO's losses and metrics, on sequence log-probabilities.

DPO (Rafailov et al. 2023). With log-ratios rho = log pi(y|x) - log pi_ref(y|x) of the chosen (w)
and rejected (l) responses and delta = rho_w - rho_l:

- sigmoid:  -log sigma(beta delta)
- sigmoid with label_smoothing eps (conservative DPO, Mitchell 2023: the label is wrong with
  probability eps): -(1 - eps) log sigma(beta delta) - eps log sigma(-beta delta)
- ipo (Azar et al. 2023): (delta' - 1 / (2 beta))^2 with delta' the log-ratios divided by each
  response's token count, as TRL computes it (confirmed there with the IPO authors)
- plus, with nll_weight alpha (RPO, Pang et al. 2024): alpha * -log pi(y_w|x) / |y_w|, the chosen
  response's per-token NLL. DPO alone only orders chosen above rejected; it can lower both and
  move probability onto neither (measured in docs/preferences.md), the NLL term holds chosen up.
  (TRL's "sft" loss term averages over the batch's tokens instead of per pair.)

Metrics as TRL defines them: rewards beta * rho for chosen and rejected, reward accuracy = share of
pairs with chosen reward > rejected reward (strictly: a tie counts as wrong, so a policy equal to
its reference scores 0), margin = mean(chosen reward - rejected reward), the policy's log-probs of
each response, and `logratio`: the mean sequence log-ratio log pi(y|x) - log pi_ref(y|x) over
the pairs' responses, chosen and rejected alike (= (reward_chosen + reward_rejected) / (2 beta)).
It is not a KL estimate: the responses are the data's, not samples of pi, so its expectation is
not KL(pi || pi_ref), and it is negative whenever the policy lowers the likelihood of both
responses of a pair, which DPO usually does (a KL floored at 0 would read 0 then).

Every function returns per-pair values; metric helpers return SUMS over the pairs, so that
micro-batches, accumulation and ranks add up and the runtime divides once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from qatune.errors import UserError

DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the KL anchor; IPO's tau
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO's -log sigma(beta * margin); ipo: Azar et al. 2023
    label_smoothing: float = 0.0  # conservative DPO's eps (sigmoid loss only), in [0, 0.5)
    nll_weight: float = 0.0  # RPO's alpha: + alpha x the chosen response's per-token NLL
    # Reference log-probs: computed once for the whole data set before training (cached in the
    # run folder, reused on resume) instead of a reference forward in every step.
    precompute_reference: bool = False

    def __post_init__(self) -> None:
        if self.loss not in DPO_LOSSES:
            raise UserError(f"dpo.loss: {self.loss!r} is not one of {', '.join(DPO_LOSSES)}")
        if self.beta <= 0:
            raise UserError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise UserError("dpo.label_smoothing applies to the sigmoid loss only")
        if self.nll_weight < 0:
            raise UserError(f"dpo.nll_weight must be >= 0, got {self.nll_weight}")


def dpo_losses(
    chosen_logratio: torch.Tensor,
    rejected_logratio: torch.Tensor,
    cfg: DPOConfig,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    chosen_logps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair DPO losses (P,) from the log-ratios (P,) of chosen and rejected responses (and,
    for IPO and the NLL term, their token counts and the chosen log-probs)."""
    if cfg.loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs the token count of each response")
        delta = chosen_logratio / chosen_tokens.clamp(min=1) - rejected_logratio / rejected_tokens.clamp(min=1)
        loss = (delta - 1 / (2 * cfg.beta)) ** 2
    else:
        z = cfg.beta * (chosen_logratio - rejected_logratio)
        loss = -F.logsigmoid(z)
        if cfg.label_smoothing:
            loss = (1 - cfg.label_smoothing) * loss - cfg.label_smoothing * F.logsigmoid(-z)
    if cfg.nll_weight:
        if chosen_logps is None or chosen_tokens is None:
            raise ValueError("the NLL term needs the chosen responses' log-probs and token counts")
        loss = loss - cfg.nll_weight * chosen_logps / chosen_tokens.clamp(min=1)
    return loss


def dpo_metric_sums(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Sums over the pairs of a batch; sequences interleaved (2k chosen, 2k+1 rejected), detached."""
    policy_logps, ref_logps = policy_logps.detach().float(), ref_logps.float()
    rewards = beta * (policy_logps - ref_logps)
    chosen, rejected = rewards[0::2], rewards[1::2]
    return {
        "reward_accuracy": (chosen > rejected).float().sum(),
        "margin": (chosen - rejected).sum(),
        "reward_chosen": chosen.sum(),
        "reward_rejected": rejected.sum(),
        "logp_chosen": policy_logps[0::2].sum(),
        "logp_rejected": policy_logps[1::2].sum(),
        "logratio": (policy_logps - ref_logps).view(-1, 2).mean(1).sum(),  # per pair, mean of its two
    }


def dpo_summary(totals: dict[str, float], pairs: int) -> dict[str, float]:
    """Summed metrics -> the logged means (per pair)."""
    return {k: v / pairs for k, v in totals.items()}
