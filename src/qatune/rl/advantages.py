"""Advantages: GAE for PPO, group-normalized rewards for GRPO, and whitening.

All per-token tensors are (B, R) with a bool `mask` of real response tokens; positions past a
response's end must hold 0 in `rewards` and `values` (the rollout buffer keeps them so).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums over ranks (identity in one process)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), per token, backward in time:
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    The state after a response's last token is terminal (V = 0): an EOS ends the episode, and so
    does the length limit. Returns (advantages, returns = advantages + values), 0 past the end."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    R = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = False, reduce: Reduce = _local, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over the masked entries (of every rank, through `reduce`); the mean is added
    back when `shift_mean`. The variance is the unbiased one. Masked-out entries become 0."""
    m = mask.to(torch.float64)
    x64 = x.to(torch.float64)
    stats = reduce(torch.stack([(x64 * m).sum(), (x64 * x64 * m).sum(), m.sum()]))
    total, total_sq, n = stats.tolist()
    if n < 2:
        raise ValueError(f"whitening needs at least 2 values, got {int(n)}")
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * n / (n - 1)
    out = (x64 - mean) / (var + eps) ** 0.5
    if shift_mean:
        out = out + mean
    return (out * m).to(x.dtype)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): each response's reward minus the mean of its group
    (the responses to the same prompt, consecutive in `rewards`), divided by the group's standard
    deviation (unbiased, + eps) when `scale`. A group whose rewards are all equal gets 0: it carries
    no signal about which response was better."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    # fp64 for a few numbers: the result is the fp64 value rounded once to the rewards' dtype
    groups = rewards.view(-1, group_size).to(torch.float64)
    centered = groups - groups.mean(-1, keepdim=True)
    if scale:
        std = groups.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centered = centered / (std + eps)
    return centered.view(-1).to(torch.promote_types(rewards.dtype, torch.float32))
