"""Rollouts: the log-probs, entropies and values recorded while sampling equal a fresh forward pass
of the same tokens (fp32, 1e-5), with left-padded prompts of different lengths; ends recorded;
sampling seeded. For a model of each family (`tests/tiny_models.py`: GPT-2, and a Llama with GQA
and an untied head)."""

from __future__ import annotations

import pytest
import torch
from tests.tiny_models import FAMILIES, tiny_lm

from qatune.model.attention import DecoderLM
from qatune.model.gpt2 import GPT2, GPT2Config
from qatune.rl.rollout import RolloutConfig, sample_rollout

EOS = 63
CFG = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=64)


def models(family: str = "gpt2"):
    if family != "gpt2":
        return llama_models()
    torch.manual_seed(0)
    policy, reference = GPT2(CFG), GPT2(CFG)
    with torch.no_grad():  # random biases and LayerNorm affine: nothing hides behind zeros and ones
        for p in [*policy.parameters(), *reference.parameters()]:
            if p.dim() == 1:
                p.normal_(0, 0.2)
        policy.wte.weight[EOS] = 0.7 * policy.ln_f.bias  # so some rows stop at EOS within the budget
    return policy, reference


def llama_models():
    policy, reference = (tiny_lm("llama", vocab_size=CFG.vocab_size, n_positions=64, seed=s) for s in (0, 1))
    with torch.no_grad():  # the head's EOS row along the mean final hidden state: some rows stop at EOS
        mean = policy(torch.randint(0, EOS, (4, 16), generator=torch.Generator().manual_seed(0))).mean((0, 1))
        policy.head_weight[EOS] = 2.0 * mean / mean.norm() ** 2
    return policy, reference


PROMPTS = [[5, 9, 2, 7, 1], [3], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46]]


def fresh(model: DecoderLM, prompt: list[int], response: list[int], temperature: float):
    """Log-prob and entropy of each response token and the hidden state that predicted it, from one
    forward pass over prompt + response alone (no padding, no cache)."""
    ids = torch.tensor([prompt + response])
    hidden = model(ids)[0, len(prompt) - 1 : -1]
    logp = torch.log_softmax(model.lm_head(hidden) / temperature, dim=-1)
    chosen = logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    return chosen, -(logp.exp() * logp).sum(-1), hidden


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_logprobs_equal_a_fresh_forward_with_left_padding(family):
    policy, reference = models(family)
    head = torch.nn.Linear(CFG.n_embd, 1)
    value = lambda h: head(h).squeeze(-1)
    cfg = RolloutConfig(max_new_tokens=12, temperature=0.7)
    out = sample_rollout(policy, PROMPTS, EOS, cfg, torch.Generator().manual_seed(1), reference, value)
    assert out.prompt_ids == PROMPTS
    assert any(out.stopped_at_eos) and not all(out.stopped_at_eos)  # both ends are exercised
    assert out.mask.shape == out.logprobs.shape == (4, max(out.lengths))
    assert out.generated_tokens == sum(out.lengths) == int(out.mask.sum())
    with torch.no_grad():
        for i, (prompt, response) in enumerate(zip(PROMPTS, out.response_ids)):
            n = len(response)
            assert out.stopped_at_eos[i] == (response[-1] == EOS)
            assert EOS not in response[:-1] and (out.stopped_at_eos[i] or n == 12)
            assert out.mask[i].tolist() == [True] * n + [False] * (out.mask.shape[1] - n)
            lp, ent, hidden = fresh(policy, prompt, response, 0.7)
            ref_lp, _, _ = fresh(reference, prompt, response, 0.7)
            # KV-cached decoding vs one full forward, fp32 log-probs of size ~10: measured <= 1e-6
            torch.testing.assert_close(out.logprobs[i, :n], lp, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.entropy[i, :n], ent, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.ref_logprobs[i, :n], ref_lp, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.values[i, :n], value(hidden), atol=1e-5, rtol=0)
            assert (out.logprobs[i, n:] == 0).all() and (out.ref_logprobs[i, n:] == 0).all()


def test_rollout_is_seeded_and_leaves_the_policy_in_training_mode():
    policy, _ = models()
    policy.train()
    cfg = RolloutConfig(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9)
    a = sample_rollout(policy, PROMPTS, EOS, cfg, torch.Generator().manual_seed(5))
    b = sample_rollout(policy, PROMPTS, EOS, cfg, torch.Generator().manual_seed(5))
    c = sample_rollout(policy, PROMPTS, EOS, cfg, torch.Generator().manual_seed(6))
    assert a.response_ids == b.response_ids and torch.equal(a.logprobs, b.logprobs)
    assert a.response_ids != c.response_ids
    assert a.ref_logprobs is None and a.values is None
    assert policy.training


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_training_batch_lines_up_with_the_recorded_logprobs(family):
    """Experiences packed into rows (block-causal, positions restarted): the labelled positions of a
    training forward give back the log-probs recorded while sampling, token for token."""
    from qatune.data.example import IGNORE
    from qatune.rl.experience import Experience, make_batch

    policy, reference = models(family)
    cfg = RolloutConfig(max_new_tokens=12, temperature=0.7)
    out = sample_rollout(policy, PROMPTS, EOS, cfg, torch.Generator().manual_seed(1), reference)
    experiences = [
        Experience(p, r, out.logprobs[i, : len(r)], out.ref_logprobs[i, : len(r)], torch.full((len(r),), float(i)))
        for i, (p, r) in enumerate(zip(out.prompt_ids, out.response_ids))
    ]
    rl = make_batch(experiences, row_capacity=24, pad_id=0)
    b = rl.batch
    assert b.doc_ids is not None and b.input_ids.shape[0] < len(PROMPTS)  # some rows hold two
    assert rl.count == sum(out.lengths) == rl.old_logprobs.numel() == rl.advantages.numel()
    with torch.no_grad():
        hidden = policy(b.input_ids, position_ids=b.position_ids, doc_ids=b.doc_ids)
        keep = b.targets != IGNORE
        logp = torch.log_softmax(policy.lm_head(hidden[keep]) / 0.7, dim=-1)
        chosen = logp.gather(-1, b.targets[keep][:, None]).squeeze(-1)
    torch.testing.assert_close(chosen, rl.old_logprobs, atol=1e-5, rtol=0)  # fp32 log-probs of size ~10
