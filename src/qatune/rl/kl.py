"""The KL term that keeps the policy near the reference (the SFT model), and its controller.

RLHF maximizes E[r(x, y)] - beta * KL(pi || pi_ref). Along one sampled response the KL is
estimated token by token: kl_t = log pi(y_t | ...) - log pi_ref(y_t | ...), whose expectation
under pi is the true KL (the "k1" estimator; a single sample may be negative). PPO puts it in the
reward: every token earns -beta * kl_t, and the last token also earns the score (Ziegler et al.
2019, "Fine-Tuning Language Models from Human Preferences"; InstructGPT). GRPO puts it in the
loss with the "k3" estimator exp(-d) + d - 1 (d = log pi - log pi_ref), which is never negative
and has the same expectation (Schulman, "Approximating KL divergence", 2020; DeepSeekMath).

beta is fixed, or adapted toward a target KL per response (Ziegler et al. 2019, sec. 2.2):
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
after each rollout batch of n responses: beta grows while the policy drifts past the target and
shrinks while it stays closer.
"""

from __future__ import annotations

import torch

from qatune.errors import UserError


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log pi - log pi_ref."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate exp(r) - r - 1 with r = log pi_ref - log pi: >= 0, unbiased."""
    r = ref_logprobs - logprobs
    return torch.exp(r) - r - 1


def penalized_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, R): -beta * kl_t at every response token, plus the response's score
    at its last token; and the per-token KL (B, R). Positions past a response's end are 0."""
    kl = kl_k1(logprobs, ref_logprobs) * mask
    rewards = -beta * kl
    last = mask.sum(-1).long() - 1  # index of each response's last token
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


class KLController:
    """beta, fixed (`target` None) or adaptive toward `target` nats per response."""

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000) -> None:
        if beta < 0:
            raise UserError(f"the KL coefficient must be >= 0, got {beta}")
        if target is not None and target <= 0:
            raise UserError(f"the KL target must be > 0, got {target}")
        self.value, self.target, self.horizon = float(beta), target, horizon

    def update(self, kl: float, n_responses: int) -> None:
        """After a rollout batch whose mean KL per response was `kl`."""
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_responses / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
