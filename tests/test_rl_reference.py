"""PPO's and GRPO's experiences and losses against plain per-sequence fp64 references written here
from the papers, not from the code under test:

- PPO (Schulman et al. 2017, eq. 7; the KL penalty in every token's reward, the score at the last
  one: Ziegler et al. 2019, Ouyang et al. 2022; TRL's PPOTrainer): r_t = -beta (log pi - log pi_ref)
  (+ score at t = T-1), GAE A_t = sum_k (gamma lam)^(k-t) delta_k with delta_k = r_k + gamma V_{k+1}
  - V_k and V_T = 0, returns A + V, advantages whitened over the rollout (TRL's masked_whiten:
  unbiased variance, rsqrt(var + 1e-8)); loss per token -min(rho A, clip(rho, 1 -+ eps) A) +
  c_v 0.5 max((V - G)^2, (V_old + clip(V - V_old, -+ eps_v) - G)^2).
- GRPO (Shao et al. 2024; TRL's GRPOTrainer): A_i = (r_i - mean_group) / (std_group + 1e-4)
  (unbiased std; no division without scale_rewards), on every token of response i; loss per token
  -min(rho A, clip(rho) A) + beta (exp(ref - logp) - (ref - logp) - 1) (the k3 estimator).

Log-probs come from one unpacked sequence at a time, full logits, log_softmax of logits / T; the
code packs several responses per row (block-causal) and runs its fused, chunked LM head. Inputs and
models are fp64: loss and gradients agree to ~1e-12 relative to the sum of the terms' sizes. The
experiences are computed in the rollout's dtype (fp64 here) and handed over as fp32 tensors: one
rounding, 2^-24 relative. The steps are checked for a model of each family (`tests/tiny_models.py`:
GPT-2, and a Llama with GQA and an untied head).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tests.tiny_models import FAMILIES, tiny_lm

from qatune.methods.grpo import GRPO
from qatune.methods.online.config import RLConfig
from qatune.methods.ppo.method import PPO, PolicyWithValue
from qatune.model.attention import DecoderLM
from qatune.rl.experience import Experience, make_batch
from qatune.rl.kl import KLController
from qatune.rl.rollout import Rollout, RolloutConfig

EOS = 96
TEMPERATURE = 0.7
FP32_ROUNDING = 2.0**-24  # |fl32(x) - x| <= 2^-24 |x|
FP64_TOL = 1e-12


def sequences(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) token ids of different lengths; some responses end with EOS."""
    rng = random.Random(seed)
    word = lambda k: [rng.randrange(0, EOS) for _ in range(k)]
    return [(word(rng.randint(1, 6)), word(rng.randint(1, 6)) + [EOS] * (i % 2)) for i in range(n)]


def plain_logps(model: DecoderLM, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log pi_T(response_t | prompt, response_<t) per response token: one sequence, full logits."""
    hidden = model(torch.tensor([prompt + response]))[0]
    logp = torch.log_softmax(F.linear(hidden / TEMPERATURE, model.head_weight), -1)
    rows = torch.arange(len(response)) + len(prompt) - 1
    return logp[rows, torch.tensor(response)]


def plain_values(model: PolicyWithValue, prompt: list[int], response: list[int]) -> torch.Tensor:
    """The value head's output at the position that emits each response token."""
    hidden = model.backbone(torch.tensor([prompt + response]))[0]
    return model.value_head(hidden).squeeze(-1)[torch.arange(len(response)) + len(prompt) - 1]


def fp32(t: torch.Tensor) -> torch.Tensor:
    """What the experiences hold: fp32 (make_batch casts to it)."""
    return t.detach().float()


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(got: dict, want: dict, scale: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=FP64_TOL * scale, msg=name)


def method(cls, rl: RLConfig, beta: float, chunk: int = 5):
    """A method with just what `experiences` and `step` read (no data, no runtime)."""
    m = cls([])
    m.rl, m.kl = rl, KLController(beta)
    one_process = lambda values: values  # RunContext.sum_over_ranks in a single process
    settings = SimpleNamespace(loss_chunk=chunk)
    m.run = SimpleNamespace(device=torch.device("cpu"), settings=settings, sum_over_ranks=one_process)
    return m


def random_experiences(model: DecoderLM, seqs, seed: int, values=None) -> list[Experience]:
    """Experiences with the policy's own log-probs moved by noise (ratios from ~0.5 to ~2: both
    clips active), a reference elsewhere, advantages of either sign."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (prompt, response) in enumerate(seqs):
        with torch.no_grad():
            lp = plain_logps(model, prompt, response)
        n = len(response)
        noise = lambda scale, n=n: scale * torch.randn(n, generator=g, dtype=torch.float64)
        extra = {}
        if values is not None:
            extra = {"returns": fp32(noise(1.0)), "old_values": fp32(values[i] + noise(0.3))}
        old, ref, adv = fp32(lp + noise(0.4)), fp32(lp + noise(0.5)), fp32(noise(1.0))
        out.append(Experience(prompt, response, old, ref, adv, **extra))
    return out


def surrogate(logp, old, adv, clip):
    """-min(rho A, clip(rho, 1 - eps, 1 + eps) A), and whether the clipped term is the smaller one."""
    rho = torch.exp(logp - old)
    a, b = rho * adv, torch.clamp(rho, 1 - clip, 1 + clip) * adv
    return -torch.minimum(a, b), b < a


def small(family: str, seed: int) -> DecoderLM:
    return tiny_lm(family, vocab_size=EOS + 1, n_positions=64, seed=seed).double()


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_step_equals_the_clipped_surrogate_plus_k3_per_sequence(family):
    model = small(family, 0)
    seqs = sequences(7, seed=1)
    exps = random_experiences(model, seqs, seed=2)
    rl, beta = RLConfig(clip=0.2, rollout=RolloutConfig(temperature=TEMPERATURE)), 0.3
    grpo = method(GRPO, rl, beta)
    batch = make_batch(exps, row_capacity=20, pad_id=0)  # several responses per row
    assert batch.batch.input_ids.shape[0] < len(exps)
    out = grpo.step(model, batch)
    out.loss_sum.backward()
    got = grads(model)

    want, terms, clipped, k3_sum, approx = 0.0, 0.0, 0, 0.0, 0.0
    for e in exps:
        logp = plain_logps(model, e.prompt_ids, e.response_ids)
        old, ref, adv = e.old_logprobs.double(), e.ref_logprobs.double(), e.advantages.double()
        s, c = surrogate(logp, old, adv, rl.clip)
        d = ref - logp
        k3 = torch.exp(d) - d - 1
        want = want + (s + beta * k3).sum()
        terms += float((s.abs() + beta * k3).sum().detach())
        clipped += int(c.sum())
        k3_sum += float(k3.sum().detach())
        approx += float((0.5 * (logp - old) ** 2).sum().detach())
    assert 0 < clipped < out.count  # both branches of the min are exercised
    assert out.count == sum(len(r) for _, r in seqs)
    assert float(out.loss_sum.detach()) == pytest.approx(float(want.detach()), abs=FP64_TOL * terms)
    assert int(out.metrics["clipped_tokens"]) == clipped
    assert float(out.metrics["kl_k3_sum"]) == pytest.approx(k3_sum, rel=FP64_TOL)
    assert float(out.metrics["approx_kl_sum"]) == pytest.approx(approx, rel=FP64_TOL)
    want.backward()
    assert_same_grads(got, grads(model), terms)


@pytest.mark.parametrize("family", FAMILIES)
def test_ppo_step_equals_the_clipped_surrogate_plus_clipped_value_loss_per_sequence(family):
    model = PolicyWithValue(small(family, 3)).double()
    torch.nn.init.normal_(model.value_head.weight, std=0.5)  # values that vary (they start at 0)
    seqs = sequences(6, seed=4)
    with torch.no_grad():
        values = [plain_values(model, p, r) for p, r in seqs]
    exps = random_experiences(model.backbone, seqs, seed=5, values=values)
    rl = RLConfig(clip=0.2, value_clip=0.1, value_coef=0.7, rollout=RolloutConfig(temperature=TEMPERATURE))
    ppo = method(PPO, rl, beta=0.3)  # PPO's KL is in the rewards: its loss has no KL term
    out = ppo.step(model, make_batch(exps, row_capacity=20, pad_id=0))
    out.loss_sum.backward()
    got = grads(model)

    want, terms, value_clipped = 0.0, 0.0, 0
    for e in exps:
        logp = plain_logps(model.backbone, e.prompt_ids, e.response_ids)
        s, _ = surrogate(logp, e.old_logprobs.double(), e.advantages.double(), rl.clip)
        v, v_old, g = plain_values(model, e.prompt_ids, e.response_ids), e.old_values.double(), e.returns.double()
        v_clip = v_old + torch.clamp(v - v_old, -rl.value_clip, rl.value_clip)
        vl = 0.5 * torch.maximum((v - g) ** 2, (v_clip - g) ** 2)
        value_clipped += int(((v_clip - g) ** 2 > (v - g) ** 2).sum())
        want = want + s.sum() + rl.value_coef * vl.sum()
        terms += float((s.abs().sum() + rl.value_coef * vl.sum()).detach())
    assert 0 < value_clipped < out.count
    assert float(out.loss_sum.detach()) == pytest.approx(float(want.detach()), abs=FP64_TOL * terms)
    assert int(out.metrics["value_clipped_tokens"]) == value_clipped
    want.backward()
    assert_same_grads(got, grads(model), terms)


def rollout(seqs, seed: int) -> Rollout:
    """A sampled batch as `sample_rollout` hands it over: (B, R) tensors, 0 past each end."""
    g = torch.Generator().manual_seed(seed)
    B, R = len(seqs), max(len(r) for _, r in seqs)
    mask = torch.zeros(B, R, dtype=torch.bool)
    for i, (_, r) in enumerate(seqs):
        mask[i, : len(r)] = True
    rand = lambda scale, shift=0.0: (torch.randn(B, R, generator=g, dtype=torch.float64) * scale + shift) * mask
    logprobs = rand(0.5, -1.5)
    return Rollout(
        prompt_ids=[p for p, _ in seqs],
        response_ids=[r for _, r in seqs],
        logprobs=logprobs,
        ref_logprobs=logprobs + rand(0.3),
        entropy=rand(0.1, 1.0),
        values=rand(0.8),
        mask=mask,
        stopped_at_eos=[r[-1] == EOS for _, r in seqs],
        generated_tokens=int(mask.sum()),
    )


def whiten(x: torch.Tensor) -> torch.Tensor:
    """TRL's masked_whiten over the given values: (x - mean) * rsqrt(unbiased var + 1e-8)."""
    return (x - x.mean()) / torch.sqrt(x.var(unbiased=True) + 1e-8)


def plain_ppo_experience(lp, ref, values, score, beta, gamma, lam):
    """Rewards, GAE and returns of one response (its T tokens), summed explicitly, not recursively."""
    T = len(lp)
    rewards = -beta * (lp - ref)
    rewards[T - 1] += score
    next_values = torch.cat([values[1:], torch.zeros(1, dtype=values.dtype)])  # V_T = 0: the episode ends
    delta = rewards + gamma * next_values - values
    adv = torch.stack([sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, T)) for t in range(T)])
    return adv, adv + values


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_ppo_experiences_equal_kl_penalized_rewards_gae_and_whitening(whiten_rewards):
    seqs = sequences(6, seed=7)
    sampled = rollout(seqs, seed=8)
    scores = torch.tensor([1.0, 0.0, 0.5, 1.0, -0.25, 0.0], dtype=torch.float64)
    rl = RLConfig(gamma=0.9, lam=0.8, whiten_rewards=whiten_rewards, whiten_advantages=True)
    ppo = method(PPO, rl, beta=0.07)
    ppo.wrapped = SimpleNamespace(critic=None)  # the values recorded while sampling
    got, extra = ppo.experiences(sampled, scores)

    s = whiten(scores) if whiten_rewards else scores
    per_seq = []
    for i, (_, r) in enumerate(seqs):
        n = len(r)
        lp, ref, v = sampled.logprobs[i, :n], sampled.ref_logprobs[i, :n], sampled.values[i, :n]
        per_seq.append((lp, ref, v, *plain_ppo_experience(lp, ref, v, s[i], 0.07, rl.gamma, rl.lam)))
    advantages = whiten(torch.cat([a for *_, a, _ in per_seq])).split([len(r) for _, r in seqs])
    close = lambda a, b: torch.testing.assert_close(a.double(), b, rtol=2 * FP32_ROUNDING, atol=FP64_TOL)
    for e, (lp, ref, v, _, returns), adv, (p, r) in zip(got, per_seq, advantages, seqs):
        assert e.prompt_ids == p and e.response_ids == r
        for name, value in (("old_logprobs", lp), ("ref_logprobs", ref), ("advantages", adv)):
            close(getattr(e, name), value)
        close(e.returns, returns)
        close(e.old_values, v)
    assert extra["value_sum"] == pytest.approx(float(sum(v.sum() for _, _, v, _, _ in per_seq)), rel=FP64_TOL)
    assert extra["return_sum"] == pytest.approx(float(sum(g.sum() for *_, g in per_seq)), rel=FP64_TOL)


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_experiences_equal_group_relative_advantages(scale):
    G = 3
    seqs = sequences(9, seed=9)
    sampled = rollout(seqs, seed=10)
    scores = torch.tensor([1.0, 0.0, 0.0, 0.25, 0.25, 0.25, 0.9, -0.3, 2.0], dtype=torch.float64)  # group 2: flat
    grpo = method(GRPO, RLConfig(group_size=G, scale_rewards=scale), beta=0.04)
    got, extra = grpo.experiences(sampled, scores)

    assert extra == {"groups": 3.0, "flat_groups": 1.0}
    for i, (e, (p, r)) in enumerate(zip(got, seqs)):
        group = scores[i // G * G : i // G * G + G]
        adv = scores[i] - group.mean()
        if scale:
            adv = adv / (group.std(unbiased=True) + 1e-4)
        assert e.prompt_ids == p and e.response_ids == r
        n = len(r)
        torch.testing.assert_close(e.advantages.double(), adv.expand(n), rtol=FP32_ROUNDING, atol=FP64_TOL)
        torch.testing.assert_close(e.old_logprobs.double(), sampled.logprobs[i, :n], rtol=FP32_ROUNDING, atol=0)
        torch.testing.assert_close(e.ref_logprobs.double(), sampled.ref_logprobs[i, :n], rtol=FP32_ROUNDING, atol=0)
        assert e.returns is None and e.old_values is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_a_group_with_equal_rewards_moves_the_policy_only_through_the_kl_term(beta, family):
    """Its advantages are 0, so the surrogate adds no gradient; with beta > 0 the k3 term pulls
    the group's tokens toward the reference (the reference here is not the policy: k3's gradient
    vanishes where they agree)."""
    model, reference = small(family, 11), small(family, 12)
    G = 4
    seqs = sequences(G, seed=12)
    with torch.no_grad():
        lp = [plain_logps(model, p, r) for p, r in seqs]
        ref = [plain_logps(reference, p, r) for p, r in seqs]
    R = max(len(r) for _, r in seqs)
    pad = lambda ts: torch.stack([F.pad(t, (0, R - len(t))) for t in ts])
    sampled = rollout(seqs, seed=13)
    sampled.logprobs, sampled.ref_logprobs = pad(lp), pad(ref)
    grpo = method(GRPO, RLConfig(group_size=G, rollout=RolloutConfig(temperature=TEMPERATURE)), beta=beta)
    exps, extra = grpo.experiences(sampled, torch.ones(G))  # every response scored the same
    assert extra["flat_groups"] == 1.0 and all((e.advantages == 0).all() for e in exps)
    grpo.step(model, make_batch(exps, row_capacity=64, pad_id=0)).loss_sum.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    if beta:
        assert norm > 1e-3
    else:
        assert norm == 0.0
