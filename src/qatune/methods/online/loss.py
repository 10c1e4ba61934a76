"""The online methods' policy loss: PPO's clipped surrogate plus a KL penalty to the reference
(GRPO puts it in the loss, PPO in the rewards: kl_coef 0), on the tokens of sampled responses."""

from __future__ import annotations

import torch

from qatune.data.batching import model_inputs
from qatune.kernels.logprobs import fused_logprob_loss
from qatune.kernels.loss import select_labelled
from qatune.rl.experience import RLBatch
from qatune.rl.kl import kl_k3
from qatune.rl.losses import clipped_surrogate
from qatune.train.step import lm_weight, scored_rows_only


def policy_loss(model, batch: RLBatch, clip: float, temperature: float, kl_coef: float, chunk: int):
    """(sum over the micro-batch's response tokens of the clipped surrogate + kl_coef * KL_k3, the
    model's output, summed metrics with the batch's rollout statistics). Through the fused LM
    head: each chunk's log-probs give its tokens' losses and gradients while its logits exist (3
    head matmuls per token)."""
    b = batch.batch
    cut = scored_rows_only(model, b.label_index)
    out = model(**model_inputs(b), **cut)
    hidden = out[0] if isinstance(out, tuple) else out
    rows, targets = select_labelled(hidden, b.targets, b.label_index)
    old, adv, ref = batch.old_logprobs, batch.advantages, batch.ref_logprobs
    sums: dict = {}

    def loss_fn(logp: torch.Tensor, start: int, end: int) -> torch.Tensor:
        surrogate, clipped = clipped_surrogate(logp, old[start:end], adv[start:end], clip)
        kl = kl_k3(logp, ref[start:end])
        log_ratio = (logp - old[start:end]).detach()
        parts = {
            "policy_loss_sum": surrogate.detach().sum(),
            "clipped_tokens": clipped.sum(),
            "kl_k3_sum": kl.detach().sum(),
            "approx_kl_sum": (0.5 * log_ratio**2).sum(),  # KL(pi_old || pi) to second order
        }
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        return (surrogate + kl_coef * kl).sum() if kl_coef else surrogate.sum()

    n = rows.shape[0]
    bounds = [*range(0, n, chunk), n]  # the loss couples no two tokens: any split into chunks will do
    into_grad = cut.get("sparse_embedding_grad", False)
    args = (rows / temperature, lm_weight(model), targets, bounds, loss_fn, chunk)
    loss = fused_logprob_loss(*args, weight_grad_into_grad=into_grad)
    sums.update(batch.rollout_stats or {})  # counted once per rollout, on the micro-batch that carries them
    return loss, out, sums
