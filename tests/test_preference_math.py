"""DPO and reward-model math against plain references: full logits, one sequence at a time, fp64;
for a model of each family (`tests/tiny_models.py`: GPT-2, and a Llama with GQA and an untied head)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from tests.tiny_models import FAMILIES, tiny_lm

from qatune.data.batching import model_inputs
from qatune.data.preference.batching import collate_pairs
from qatune.data.preference.encode import EncodedPair
from qatune.methods.dpo.loss import DPOConfig, dpo_summary
from qatune.methods.dpo.step import dpo_loss_sum, sequence_logps
from qatune.methods.reward.loss import RewardConfig, reward_loss_sum, reward_summary
from qatune.model.attention import DecoderLM
from qatune.model.reward import RewardModel

EOS = 96


def random_pairs(n: int, seed: int = 0) -> list[EncodedPair]:
    rng = random.Random(seed)
    word = lambda k: [rng.randrange(0, EOS) for _ in range(k)]
    return [
        EncodedPair(
            word(rng.randint(1, 6)), word(rng.randint(1, 5)) + [EOS], word(rng.randint(1, 5)) + [EOS], margin=i / 4
        )
        for i in range(n)
    ]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def small(family: str, seed: int) -> DecoderLM:
    return tiny_lm(family, vocab_size=EOS + 1, n_positions=64, seed=seed)


def models(family: str, seed: int = 0) -> tuple[DecoderLM, DecoderLM]:
    policy, reference = small(family, seed).double(), small(family, seed + 1000).double()
    for p in reference.parameters():
        p.requires_grad_(False)
    return policy, reference


def plain_logp(model: DecoderLM, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log pi(response | prompt): one unpacked sequence, full logits, log_softmax."""
    ids = torch.tensor([prompt + response])
    logits = F.linear(model(ids), model.head_weight)[0]
    logp = torch.log_softmax(logits, -1)
    n = len(prompt)
    return sum(logp[n - 1 + i, tok] for i, tok in enumerate(response))


def plain_dpo(policy, reference, pairs, cfg: DPOConfig) -> torch.Tensor:
    total = 0.0
    for p in pairs:
        rc, rr = (
            plain_logp(policy, p.prompt_ids, r) - plain_logp(reference, p.prompt_ids, r)
            for r in (p.chosen_ids, p.rejected_ids)
        )
        total = total - cfg.nll_weight * plain_logp(policy, p.prompt_ids, p.chosen_ids) / len(p.chosen_ids)
        if cfg.loss == "ipo":
            delta = rc / len(p.chosen_ids) - rr / len(p.rejected_ids)
            total = total + (delta - 1 / (2 * cfg.beta)) ** 2
        else:
            eps = cfg.label_smoothing
            z = cfg.beta * (rc - rr)
            total = total - (1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return total


def packed_dpo(policy, reference, pairs, cfg, capacity=64, chunk=7):
    batch = collate_pairs(pairs, list(range(len(pairs))), pad_id=0, capacity=capacity)
    ref = sequence_logps(reference(**model_inputs(batch)), reference.head_weight, batch, chunk)
    return dpo_loss_sum(policy(**model_inputs(batch)), policy.head_weight, batch, ref, cfg, chunk)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        DPOConfig(beta=0.5),
        DPOConfig(beta=0.2, label_smoothing=0.1),
        DPOConfig(beta=0.3, loss="ipo"),
        DPOConfig(beta=0.5, nll_weight=0.7),
    ],
)
def test_dpo_loss_and_gradients_equal_the_plain_reference(cfg, family):
    policy, reference = models(family)
    pairs = random_pairs(5)
    loss, _ = packed_dpo(policy, reference, pairs, cfg)
    loss.backward()
    got = grads(policy)
    want_loss = plain_dpo(policy, reference, pairs, cfg)
    want_loss.backward()
    want = grads(policy)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10, msg=name)


def test_packed_rows_equal_one_pair_per_row(family):
    policy, reference = models(family, 1)
    pairs = random_pairs(6, seed=1)
    cfg = DPOConfig(beta=0.1)
    dense, _ = packed_dpo(policy, reference, pairs, cfg, capacity=64)
    dense.backward()
    g_dense = grads(policy)
    single, _ = packed_dpo(policy, reference, pairs, cfg, capacity=1)  # every pair alone in its row
    single.backward()
    torch.testing.assert_close(dense, single)
    for name, g in grads(policy).items():
        torch.testing.assert_close(g_dense[name], g, msg=name)
    assert collate_pairs(pairs, list(range(6)), 0, 64).input_ids.shape[0] < 6  # really packed


def test_micro_batches_times_accumulation_equal_one_batch(family):
    """Loss sums over pairs divided by the step's pair count: (8 pairs, 1 micro-batch) and
    (2 pairs, 4 micro-batches) give the same loss and gradient."""
    policy, reference = models(family, 2)
    pairs = random_pairs(8, seed=2)
    cfg = DPOConfig(beta=0.2)
    whole, _ = packed_dpo(policy, reference, pairs, cfg)
    (whole / 8).backward()
    g_whole = grads(policy)
    total = 0.0
    for k in range(0, 8, 2):
        part, _ = packed_dpo(policy, reference, pairs[k : k + 2], cfg)
        (part / 8).backward()
        total += float(part.detach())
    torch.testing.assert_close(torch.tensor(total / 8, dtype=torch.float64), whole.detach() / 8)
    for name, g in grads(policy).items():
        torch.testing.assert_close(g_whole[name], g, msg=name)


def test_the_policys_cut_forward_and_sparse_embedding_gradient_equal_the_plain_reference(family):
    """The DPO step's fast path: the policy returns only the response rows (`outputs=`), its token
    embedding's gradient is sparse (a tied head's: an untied Llama's embedding keeps its dense one)
    and the head's weight gradient goes straight into `.grad`; over two micro-batches the gradients
    still equal the plain reference's."""
    from qatune.train.step import scored_rows_only

    policy, reference = models(family, 3)
    pairs, cfg = random_pairs(6, seed=3), DPOConfig(beta=0.4, nll_weight=0.2)
    total = 0.0
    for part in (pairs[:3], pairs[3:]):
        batch = collate_pairs(part, list(range(3)), pad_id=0, capacity=64)
        ref = sequence_logps(reference(**model_inputs(batch)), reference.head_weight, batch, 7)
        cut = scored_rows_only(policy, batch.label_index)
        assert cut["sparse_embedding_grad"]
        hidden = policy(**model_inputs(batch), **cut)
        loss, _ = dpo_loss_sum(hidden, policy.head_weight, batch, ref, cfg, 7, weight_grad_into_grad=True)
        loss.backward()
        total += float(loss.detach())
    assert policy.head_weight.grad.layout == torch.strided  # what the optimizer and clipping read
    got = grads(policy)
    want_loss = plain_dpo(policy, reference, pairs, cfg)
    want_loss.backward()
    want = grads(policy)
    assert total == pytest.approx(float(want_loss.detach()), rel=1e-10)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10, msg=name)


def test_first_step_with_a_frozen_copy_is_log2_and_reward_accuracy_zero(family):
    policy, _ = models(family, 3)
    reference = copy.deepcopy(policy).requires_grad_(False)
    pairs = random_pairs(4, seed=3)
    loss, sums = packed_dpo(policy, reference, pairs, DPOConfig(beta=0.1))
    summary = dpo_summary({k: float(v) for k, v in sums.items()}, 4)
    assert float(loss.detach()) / 4 == pytest.approx(math.log(2), abs=1e-12)
    # TRL: accuracy = mean(chosen reward > rejected reward); equal rewards (0 and 0) are not a win.
    assert summary["reward_accuracy"] == 0.0 and summary["margin"] == pytest.approx(0.0, abs=1e-12)
    assert summary["logratio"] == 0.0
    assert summary["logp_chosen"] < 0 and summary["logp_rejected"] < 0


def test_metric_definitions_on_known_log_probs():
    from qatune.methods.dpo.loss import dpo_metric_sums

    policy = torch.tensor([-1.0, -3.0, -2.0, -1.0])  # pair 0: chosen gains; pair 1: rejected gains
    ref = torch.tensor([-2.0, -2.0, -2.0, -2.0])
    s = dpo_summary({k: float(v) for k, v in dpo_metric_sums(policy, ref, beta=0.5).items()}, 2)
    assert s["reward_chosen"] == pytest.approx((0.5 + 0.0) / 2)
    assert s["reward_rejected"] == pytest.approx((-0.5 + 0.5) / 2)
    assert s["reward_accuracy"] == 0.5 and s["margin"] == pytest.approx((1.0 - 0.5) / 2)
    assert s["logp_chosen"] == -1.5 and s["logp_rejected"] == -2.0
    assert s["logratio"] == pytest.approx(((1 - 1) / 2 + (0 + 1) / 2) / 2)


def test_dpo_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(label_smoothing=0.5)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        DPOConfig(loss="ipo", label_smoothing=0.1)


def plain_score(rm: RewardModel, prompt, response) -> torch.Tensor:
    ids = prompt + response[:-1] if response[-1] == EOS else prompt + response
    return rm.score(rm.backbone(torch.tensor([ids]))[0, -1]).squeeze()


@pytest.mark.parametrize("center", [0.0, 0.05])
def test_reward_loss_and_gradients_equal_the_plain_reference(center, family):
    rm = RewardModel(small(family, 4)).double()
    pairs = random_pairs(5, seed=4)
    batch = collate_pairs(pairs, list(range(5)), pad_id=0, capacity=64, eos_id=EOS)
    scores = rm(**model_inputs(batch), last_token=batch.last_token)
    loss, sums = reward_loss_sum(scores, batch, RewardConfig(center_coefficient=center))
    loss.backward()
    got = grads(rm)
    want = 0.0
    for p in pairs:
        sc, sr = plain_score(rm, p.prompt_ids, p.chosen_ids), plain_score(rm, p.prompt_ids, p.rejected_ids)
        want = want - F.logsigmoid(sc - sr - p.margin) + center * (sc + sr) ** 2
    want.backward()
    torch.testing.assert_close(loss, want)
    for name, g in grads(rm).items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-9, msg=name)
    summary = reward_summary({k: float(v) for k, v in sums.items()}, 5)
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["score_std"] >= 0.0


def test_exported_reward_model_scores_equal_in_transformers(tmp_path, family):
    from transformers import AutoModelForSequenceClassification

    from qatune.model.reward import export_reward_hf, load_reward_model

    rm = RewardModel(small(family, 5))
    with torch.no_grad():  # random biases and norms too, so a mapping slip cannot hide
        for name, p in rm.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.1)
    sequences = [p.prompt_ids + p.chosen_ids for p in random_pairs(6, seed=5)]
    ours = rm.score_ids(sequences, eos_id=EOS)
    out = export_reward_hf(rm, tmp_path / "rm")
    hf, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    classes = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification"}
    assert type(hf).__name__ == classes[family]
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # an untied LM head is left out
    hf.eval()
    width = max(len(s) for s in sequences) + 2
    ids = torch.tensor([s + [EOS] * (width - len(s)) for s in sequences])  # EOS-padded, like a tokenizer would
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    again = load_reward_model(out).score_ids(sequences, eos_id=EOS)
    torch.testing.assert_close(again, ours, rtol=0, atol=1e-6)
