"""PPO's clipped objectives, per token (Schulman et al. 2017, eq. 7; value clipping as in OpenAI
baselines' ppo2). Each returns per-token losses and a per-token "clipped" flag; the method sums
them over the step's response tokens and the runtime divides by their global count.
"""

from __future__ import annotations

import torch


def clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) with ratio = exp(logp - logp_old).

    The minimum makes the objective pessimistic: once the ratio has moved past 1 +- eps in the
    direction the advantage favours, the gradient is 0. Returns (loss, clipped) per token."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - G)^2, (V_clip - G)^2) with V_clip = old V moved by at most `clip`. Returns
    (loss, clipped) per token: clipped where the clipped error is the larger one."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, limited = (values - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(plain, limited), limited > plain
