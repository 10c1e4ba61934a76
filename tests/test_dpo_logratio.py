"""DPO's `logratio` metric: the mean sequence log-ratio log pi/pi_ref over the pairs' responses,
against fp64 hand computations, where DPO usually is: both responses' log-probs below the reference's."""

from __future__ import annotations

import pytest
import torch
from tests.test_preference_math import EOS, models, plain_logp, random_pairs

from qatune.data.batching import model_inputs
from qatune.data.preference.batching import collate_pairs
from qatune.methods.dpo.loss import DPOConfig, dpo_metric_sums, dpo_summary
from qatune.methods.dpo.step import dpo_loss_sum, sequence_logps


def summary(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> dict:
    sums = dpo_metric_sums(policy, ref, beta)
    return dpo_summary({k: float(v) for k, v in sums.items()}, policy.numel() // 2)


def test_logratio_is_the_mean_log_ratio_and_goes_negative_when_both_log_probs_fall():
    # Both responses of both pairs lost likelihood against the reference: log-ratios -1, -1, -0.5, -2.
    policy = torch.tensor([-3.0, -4.0, -2.5, -5.0], dtype=torch.float64)
    ref = torch.tensor([-2.0, -3.0, -2.0, -3.0], dtype=torch.float64)
    s = summary(policy, ref, beta=0.1)
    want = ((-1.0 + -1.0) / 2 + (-0.5 + -2.0) / 2) / 2  # mean over pairs of each pair's mean
    assert s["logratio"] == pytest.approx(want, rel=1e-12)
    # the rewards are fp32 metrics (beta * rho rounded once or twice): 2^-22 relative
    assert s["logratio"] == pytest.approx((s["reward_chosen"] + s["reward_rejected"]) / (2 * 0.1), rel=2**-22)
    assert "kl" not in s  # not a KL estimate: the responses are the data's, not samples of pi


def test_logratio_of_a_packed_step_equals_the_plain_fp64_log_ratios():
    policy, reference = models("gpt2", 5)  # a GPT-2: the nudge below goes through ln_f's bias
    pairs = random_pairs(5, seed=5)
    used = {t for p in pairs for t in p.chosen_ids + p.rejected_ids}
    spare = min(set(range(EOS + 1)) - used)
    with torch.no_grad():  # a policy that moves probability onto a token no response holds
        policy.load_state_dict(reference.state_dict())
        policy.ln_f.bias.add_(policy.wte.weight[spare] * (20 / policy.wte.weight[spare].norm() ** 2))
    plain = torch.tensor(
        [
            float(plain_logp(policy, p.prompt_ids, r).detach() - plain_logp(reference, p.prompt_ids, r))
            for p in pairs
            for r in (p.chosen_ids, p.rejected_ids)
        ],
        dtype=torch.float64,
    )
    assert (plain < 0).all()  # the case a floored estimate read as 0
    batch = collate_pairs(pairs, list(range(len(pairs))), pad_id=0, capacity=policy.config.n_positions)
    with torch.no_grad():
        ref = sequence_logps(reference(**model_inputs(batch)), reference.wte.weight, batch, 7)
        _, sums = dpo_loss_sum(policy(**model_inputs(batch)), policy.wte.weight, batch, ref, DPOConfig(), 7)
    got = dpo_summary({k: float(v) for k, v in sums.items()}, len(pairs))["logratio"]
    # fp64 forward, fp32 metric sums: a few fp32 roundings of values of size ~|logratio|
    assert got == pytest.approx(float(plain.view(-1, 2).mean(1).mean()), rel=2**-20)
