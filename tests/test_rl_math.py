"""The RL math against values worked out by hand (the derivation is in each comment)."""

from __future__ import annotations

import pytest
import torch

from qatune.rl.advantages import gae, group_advantages, masked_whiten
from qatune.rl.kl import KLController, kl_k1, kl_k3, penalized_rewards
from qatune.rl.losses import clipped_surrogate, clipped_value_loss
from qatune.rl.rewards import Sample, final_number, numeric_match, programmatic_reward, score

T = lambda *rows: torch.tensor(rows, dtype=torch.float32)
MASK = torch.tensor([[True, True, True], [True, True, False]])  # row 2 is 2 tokens long


def close(a, b):  # fp32 results of O(1) against exact values: a few ulps (measured 4.2e-7 on every kernel set)
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=1e-6, rtol=0)


def test_kl_penalty_goes_into_every_token_and_the_score_into_the_last():
    lp = T([-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0])
    ref = T([-1.5, -2.0, -1.0], [-0.5, -1.0, 0.0])
    # kl = lp - ref = [[0.5, 0, 0.5], [-0.5, 0, (masked)]]; reward = -0.1 * kl, + score at the last token
    rewards, kl = penalized_rewards(torch.tensor([2.0, -1.0]), lp, ref, MASK, beta=0.1)
    close(kl, [[0.5, 0.0, 0.5], [-0.5, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.0, 1.95], [0.05, -1.0, 0.0]])
    close(kl_k1(lp, ref), lp - ref)
    # k3 = exp(r) - r - 1, r = ref - lp: r = -0.5 -> e^-0.5 - 0.5; r = 0.5 -> e^0.5 - 1.5; r = 0 -> 0
    close(kl_k3(T([-1.0, -1.0, -2.0]), T([-1.5, -0.5, -2.0])), [[0.10653066, 0.14872127, 0.0]])


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(0.1)
    fixed.update(50.0, 100)
    assert fixed.value == 0.1
    ada = KLController(0.1, target=6.0, horizon=10000)
    ada.update(12.0, 100)  # error clip(12/6 - 1) = +0.2 -> x (1 + 0.2 * 100 / 10000) = x 1.002
    assert ada.value == pytest.approx(0.1002)
    ada.update(3.0, 100)  # error -0.5 clipped to -0.2 -> x 0.998
    assert ada.value == pytest.approx(0.1002 * 0.998)
    ada.update(6.6, 1000)  # error +0.1 -> x (1 + 0.1 * 0.1) = x 1.01
    assert ada.value == pytest.approx(0.1002 * 0.998 * 1.01)
    restored = KLController(0.5, target=6.0)
    restored.load_state_dict(ada.state_dict())
    assert restored.value == ada.value
    with pytest.raises(ValueError, match="target must be > 0"):
        KLController(0.1, target=0.0)


def test_gae():
    rewards = T([0.0, 0.0, 1.0], [0.5, 0.0, 0.0])
    values = T([0.1, 0.2, 0.3], [0.4, 0.5, 0.0])
    # gamma 1, lambda 0.5. Row 1: d2 = 1 - .3 = .7 -> A2 = .7; d1 = .3 - .2 = .1 -> A1 = .1 + .5*.7 = .45;
    # d0 = .2 - .1 = .1 -> A0 = .1 + .5*.45 = .325. Row 2 ends after 2 tokens (V after it = 0):
    # d1 = 0 - .5 -> A1 = -.5; d0 = .5 + .5 - .4 = .6 -> A0 = .6 + .5*(-.5) = .35.
    adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=0.5)
    close(adv, [[0.325, 0.45, 0.7], [0.35, -0.5, 0.0]])
    close(ret, [[0.425, 0.65, 1.0], [0.75, 0.0, 0.0]])
    # gamma .9, lambda 1: A_t = discounted return - V_t; row 1: G0 = .81 * 1 -> A0 = .81 - .1 = .71
    adv, _ = gae(rewards, values, MASK, gamma=0.9, lam=1.0)
    close(adv[0], [0.71, 0.70, 0.70])


def test_whitening():
    # mean 2.5, unbiased variance 5/3: (x - 2.5) / sqrt(5/3)
    whitened = masked_whiten(T([1.0, 2.0, 3.0, 4.0]), torch.ones(1, 4, dtype=torch.bool))
    close(whitened, [[-1.161895, -0.387298, 0.387298, 1.161895]])
    # the masked 100 is ignored: mean 2, variance 1; it comes out as 0
    close(masked_whiten(T([1.0, 2.0, 3.0, 100.0]), torch.tensor([[True, True, True, False]])), [[-1.0, 0.0, 1.0, 0.0]])
    shifted = masked_whiten(T([1.0, 2.0, 3.0, 100.0]), torch.tensor([[True, True, True, False]]), shift_mean=True)
    close(shifted, [[1.0, 2.0, 3.0, 0.0]])
    # statistics over ranks: `reduce` sums the local sums; two identical ranks hold 1,2,3,4 twice:
    # mean 2.5, squared deviations 2 * 5 = 10 over n - 1 = 7
    doubled = masked_whiten(T([1.0, 2.0, 3.0, 4.0]), torch.ones(1, 4, dtype=torch.bool), reduce=lambda t: 2 * t)
    close(doubled, (T([1.0, 2.0, 3.0, 4.0]) - 2.5) / (10 / 7) ** 0.5)


def test_group_advantages():
    # group 1: mean .5, unbiased std sqrt(1/3) -> +-.5 / (0.57735 + 1e-4) = +-0.865875; group 2 all equal -> 0
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    close(adv, [0.865875, -0.865875, -0.865875, 0.865875, 0.0, 0.0, 0.0, 0.0])
    close(group_advantages(torch.tensor([3.0, 1.0]), 2, scale=False), [1.0, -1.0])
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_clipped_surrogate():
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    # eps .2: (1.5, A+) -> max(-1.5, -1.2) = -1.2 clipped; (0.5, A+) -> max(-.5, -.8) = -.5;
    # (1.5, A-) -> max(1.5, 1.2) = 1.5; (0.5, A-) -> max(.5, .8) = .8 clipped; (1.1, 2) -> -2.2
    loss, clipped = clipped_surrogate(ratio.log(), torch.zeros(5), adv, clip=0.2)
    close(loss, [-1.2, -0.5, 1.5, 0.8, -2.2])
    assert clipped.tolist() == [True, False, False, True, False]
    # the gradient is 0 exactly where clipped
    lp = ratio.log().requires_grad_()
    clipped_surrogate(lp, torch.zeros(5), adv, clip=0.2)[0].sum().backward()
    assert (lp.grad == 0).tolist() == [True, False, False, True, False]


def test_clipped_value_loss():
    # old V = 1, clip .2: (V 1.5, G 2) -> V_clip 1.2: .5 * max(.25, .64) = .32 clipped;
    # (1.5, 1) -> .5 * max(.25, .04) = .125; (1.1, 0) -> V_clip = V: .5 * 1.21 = .605
    loss, clipped = clipped_value_loss(torch.tensor([1.5, 1.5, 1.1]), torch.ones(3), torch.tensor([2.0, 1.0, 0.0]), 0.2)
    close(loss, [0.32, 0.125, 0.605])
    assert clipped.tolist() == [True, False, False]


def sample(response: str, reference: str | None, stopped: bool = True, where: str = "data.jsonl:3") -> Sample:
    return Sample(where, "Q", response, reference, [1], [2], stopped)


def test_programmatic_rewards():
    assert final_number("so 2+2=<<2+2=4>>4 apples\n#### 1,234") == 1234.0
    assert final_number("It costs $18.") == 18.0 and final_number("no number") is None
    assert numeric_match("... #### 18", "Janet makes 9 * 2 = $18\n#### 18") == 1.0
    assert numeric_match("She makes 18 dollars", "#### 18") == 1.0  # no '####': the last number
    assert numeric_match("#### 17", "#### 18") == 0.0 and numeric_match("", "#### 18") == 0.0
    em = programmatic_reward("exact_match")
    assert em([sample("The Paris.", "paris"), sample("Lyon", "Paris")]) == [1.0, 0.0]
    assert programmatic_reward("f1")([sample("New York City", "New Delhi")]) == [pytest.approx(0.4)]
    with pytest.raises(ValueError, match="unknown reward 'bleu'"):
        programmatic_reward("bleu")
    with pytest.raises(ValueError, match="data.jsonl:3: the exact_match reward needs a reference answer"):
        em([sample("x", None)])


def test_no_eos_penalty_and_non_finite_rewards():
    fn = programmatic_reward("exact_match")
    rewards = score(fn, [sample("Paris", "Paris"), sample("Paris", "Paris", stopped=False)], no_eos_penalty=0.5)
    close(rewards, [1.0, 0.5])
    with pytest.raises(ValueError, match=r"facts.jsonl:7: the reward of this sample is nan"):
        score(lambda s: [1.0, float("nan")], [sample("a", "a"), sample("b", "b", where="facts.jsonl:7")])
    with pytest.raises(ValueError, match=r"the reward of this sample is inf"):
        score(lambda s: [float("inf")], [sample("a", "a")])
