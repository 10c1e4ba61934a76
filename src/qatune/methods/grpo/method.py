"""GRPO (Shao et al. 2024, DeepSeekMath): PPO's clipped objective without a value model.

Each prompt gets `rl.group_size` responses; a response's advantage is its reward minus its
group's mean, divided by the group's standard deviation (`rl.scale_rewards`), the same for every
one of its tokens. The loss per response token is

    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL_k3(pi || pi_ref)

with ratio = pi / pi_old (pi_old: the log-probs recorded while sampling), summed over the response
tokens of the step and divided by their count over the whole optimizer step (all micro-batches,
all ranks): every token weighs the same, whatever its response's length (DAPO's token-level
normalization, TRL's default `loss_type`). The cheap choice for checkable rewards: no critic to
train. A group whose responses all score the same has advantage 0, so its surrogate term adds no
gradient; with beta > 0 its KL term still does (it pulls those responses' tokens back toward the
reference), and its tokens count in the normalization.
"""

from __future__ import annotations

import torch

from qatune.errors import UserError
from qatune.methods.online import OnlineRL, policy_loss
from qatune.rl.advantages import group_advantages
from qatune.rl.experience import Experience, RLBatch
from qatune.rl.rollout import Rollout
from qatune.train.method import RunContext, StepOutput


class GRPO(OnlineRL):
    name = "grpo"
    title = "GRPO (Shao et al. 2024): PPO's clipped objective, advantages relative to a group of answers"
    # Advantages are relative to the group, so a group needs several answers, and its mean and std
    # are noisy when small: 8 is TRL's GRPOConfig default (num_generations) and this repository's
    # GSM8K config; DeepSeekMath sampled 64.
    default_group_size = 8

    def setup(self, run: RunContext) -> None:
        super().setup(run)
        if self.rl.group_size < 2:
            n = self.rl.group_size
            raise UserError(f"method grpo needs rl.group_size >= 2 (advantages are relative to the group), got {n}")

    def experiences(self, sampled: Rollout, scores: torch.Tensor) -> tuple[list[Experience], dict]:
        adv = group_advantages(scores, self.rl.group_size, self.rl.scale_rewards)
        groups = scores.view(-1, self.rl.group_size)
        flat = (groups.max(-1).values == groups.min(-1).values).sum()  # groups with no signal
        out = []
        for i, (prompt, response) in enumerate(zip(sampled.prompt_ids, sampled.response_ids)):
            n = len(response)
            lp, ref = sampled.logprobs[i, :n].cpu(), sampled.ref_logprobs[i, :n].cpu()
            out.append(Experience(prompt, response, lp, ref, torch.full((n,), float(adv[i]))))
        return out, {"groups": float(groups.shape[0]), "flat_groups": float(flat)}

    def step(self, model, batch: RLBatch, monitor: bool = False) -> StepOutput:
        rl = self.rl
        chunk = self.run.settings.loss_chunk
        loss, _, metrics = policy_loss(model, batch, rl.clip, rl.rollout.temperature, self.kl.value, chunk)
        return StepOutput(loss, batch.count, metrics)

    def summarize(self, totals: dict[str, float], count: int) -> dict:
        out = super().summarize(totals, count)
        if count:
            out["kl_loss"] = totals.get("kl_k3_sum", 0.0) / count
        if totals.get("groups"):
            out["flat_group_rate"] = totals["flat_groups"] / totals["groups"]
        return out
