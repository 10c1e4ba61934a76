"""PPO with a KL penalty to the reference (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022).

Per rollout: every response token earns -beta * (log pi - log pi_ref), the last one also the
response's score (`qatune.rl.kl.penalized_rewards`); a value head predicts each token's return;
GAE turns rewards and values into advantages (whitened over the rollout batch, all ranks), and
returns into value targets. Then `rl.epochs` passes of `rl.minibatches` optimizer steps minimize,
per response token,

    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + value_coef * 0.5 * max((V - G)^2, (V_clip - G)^2)

normalized by the response tokens of the whole optimizer step. beta is fixed or adapted toward
`rl.kl_target` after every rollout.

The critic (`rl.value_model`): by default a value head on the policy's own last hidden state
(one network, one forward; values recorded while sampling); or a separate GPT-2 — e.g. the reward
model's export, whose score head then initializes the value head, as InstructGPT initializes its
value function from the reward model.
"""

from __future__ import annotations

import torch
from torch import nn

from qatune.data.example import IGNORE
from qatune.kernels.loss import select_labelled
from qatune.methods.online import OnlineRL, policy_loss
from qatune.rl.advantages import gae, masked_whiten
from qatune.rl.experience import Experience, RLBatch, make_batch
from qatune.rl.kl import penalized_rewards
from qatune.rl.losses import clipped_value_loss
from qatune.rl.rollout import Rollout
from qatune.train.method import StepOutput


class PolicyWithValue(nn.Module):
    """The module PPO trains: the policy language model (`backbone`, what is exported) and a value head on
    its hidden states or on a separate critic's. forward -> (policy hidden states, values (B, T))."""

    def __init__(self, backbone: nn.Module, critic: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.critic = critic
        self.value_head = nn.Linear((critic or backbone).config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: no made-up baseline
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, position_ids=None, doc_ids=None, outputs=None, sparse_embedding_grad=False):
        """outputs / sparse_embedding_grad: as the model's forward (hidden states and values at
        `outputs` only); the separate critic runs no head, so its embedding gradient stays dense."""
        inputs = {"position_ids": position_ids, "doc_ids": doc_ids, "outputs": outputs}
        hidden = self.backbone(input_ids, **inputs, sparse_embedding_grad=sparse_embedding_grad)
        trunk = hidden if self.critic is None else self.critic(input_ids, **inputs)
        values = self.value_head(trunk).squeeze(-1)
        return hidden, values.to(torch.promote_types(values.dtype, torch.float32))  # fp32 at least (autocast)


def load_critic(name: str) -> tuple[nn.Module, torch.Tensor | None]:
    """(critic language model, the score head's weight when `name` is a reward model folder, else None)."""
    from qatune.model.families import from_pretrained
    from qatune.model.reward import is_reward_model, load_reward_model

    if is_reward_model(name):
        reward = load_reward_model(name)
        return reward.backbone, reward.score.weight.detach().clone()
    return from_pretrained(name), None


class PPO(OnlineRL):
    name = "ppo"
    title = "PPO with a KL penalty to the starting model (Ziegler et al. 2019)"
    plots = {**OnlineRL.plots, "value_loss": (("value_loss",), "value loss")}

    def wrap(self, model: nn.Module) -> nn.Module:
        critic, score = (None, None) if self.rl.value_model == "policy" else load_critic(self.rl.value_model)
        self.wrapped = PolicyWithValue(model, critic).to(self.run.device)
        if score is not None:
            with torch.no_grad():
                self.wrapped.value_head.weight.copy_(score)
        self.policy_module = self.wrapped
        return self.wrapped

    def rollout_value_head(self):
        if self.wrapped.critic is not None:
            return None  # the critic reads the whole sequences after sampling (`critic_values`)
        return lambda hidden: self.wrapped.value_head(hidden).squeeze(-1)

    @torch.no_grad()
    def critic_values(self, sampled: Rollout) -> torch.Tensor:
        """The separate critic's values (B, R) of the sampled responses, one packed forward."""
        rows = []
        for prompt, response in zip(sampled.prompt_ids, sampled.response_ids):
            n = len(response)
            rows.append(Experience(prompt, response, *(torch.zeros(n) for _ in range(3))))
        values = torch.zeros_like(sampled.logprobs)
        for start in range(0, len(rows), self.rl.generation_batch):
            part = rows[start : start + self.rl.generation_batch]
            packed = make_batch(part, self.context, self.pad_id)
            b = packed.batch.to(self.run.device)
            with self.run.precision.autocast():
                _, v = self.wrapped(b.input_ids, b.position_ids, b.doc_ids)
            flat = v[b.targets != IGNORE].float()
            lengths = [len(part[i].response_ids) for i in packed.order]
            for i, chunk in zip(packed.order, flat.split(lengths)):  # label order -> each response
                values[start + i, : len(chunk)] = chunk
        return values

    def experiences(self, sampled: Rollout, scores: torch.Tensor) -> tuple[list[Experience], dict]:
        rl, device = self.rl, self.run.device
        mask = sampled.mask
        values = sampled.values if self.wrapped.critic is None else self.critic_values(sampled)
        scores = scores.to(device)
        if rl.whiten_rewards:
            scores = masked_whiten(
                scores[None], torch.ones_like(scores[None], dtype=torch.bool), reduce=self.run.sum_over_ranks
            )[0]
        rewards, _ = penalized_rewards(scores, sampled.logprobs, sampled.ref_logprobs, mask, self.kl.value)
        advantages, returns = gae(rewards, values, mask, rl.gamma, rl.lam)
        if rl.whiten_advantages:
            advantages = masked_whiten(advantages, mask, reduce=self.run.sum_over_ranks)
        per_token = [t.detach().float().cpu() for t in (sampled.logprobs, sampled.ref_logprobs, advantages)]
        per_token += [returns.detach().float().cpu(), values.detach().float().cpu()]
        out = []
        for i, (prompt, response) in enumerate(zip(sampled.prompt_ids, sampled.response_ids)):
            lp, ref, adv, ret, val = (t[i, : len(response)] for t in per_token)
            out.append(Experience(prompt, response, lp, ref, adv, returns=ret, old_values=val))
        value_sum = float((values * mask).sum())
        return out, {"value_sum": value_sum, "return_sum": float((returns * mask).sum())}

    def step(self, model, batch: RLBatch, monitor: bool = False) -> StepOutput:
        rl, b = self.rl, batch.batch
        # The KL is in the rewards (and so in the advantages), not in the loss: kl_coef 0 here.
        loss, (_, values), metrics = policy_loss(
            model, batch, rl.clip, rl.rollout.temperature, 0.0, self.run.settings.loss_chunk
        )
        values = select_labelled(values[..., None], b.targets, b.label_index)[0].squeeze(-1)
        value_loss, value_clipped = clipped_value_loss(values, batch.old_values, batch.returns, rl.value_clip)
        metrics["value_loss_sum"] = value_loss.detach().sum()
        metrics["value_clipped_tokens"] = value_clipped.sum()
        return StepOutput(loss + rl.value_coef * value_loss.sum(), batch.count, metrics)

    def summarize(self, totals: dict[str, float], count: int) -> dict:
        out = super().summarize(totals, count)
        if count:
            out["value_loss"] = totals.get("value_loss_sum", 0.0) / count
            out["value_clip_frac"] = totals.get("value_clipped_tokens", 0.0) / count
            out["approx_kl"] = totals.get("approx_kl_sum", 0.0) / count
        if totals.get("rollout_responses") and totals.get("response_tokens"):
            out["value_mean"] = totals["value_sum"] / totals["response_tokens"]
        return out
