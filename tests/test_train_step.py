"""The loss normalization of an optimizer step: accumulation, packing, and the chunked loss, for a
model of each family (`tests/tiny_models.py`: GPT-2, and a Llama with GQA and an untied head)."""

from __future__ import annotations

import random

import pytest
import torch
from tests.tiny_models import FAMILIES, tiny_lm
from tests.train_helpers import step_batches

from qatune.data.example import IGNORE, EncodedExample
from qatune.data.plan import BatchConfig, make_batch, plan_run
from qatune.kernels.loss import reference_loss_sum
from qatune.methods.sft.step import train_step
from qatune.model.attention import DecoderLM
from qatune.model.gpt2 import GPT2Config
from qatune.train.step import Precision

SMALL = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=128, vocab_size=97)  # tiny_lm("gpt2")'s shape
PAD = 0


def examples_of_varied_lengths(n: int = 8, seed: int = 0) -> list[EncodedExample]:
    """Prompts of 3-20 tokens; responses from 1 to 60 tokens, so per-example means would differ
    a lot from the per-token mean."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, 97) for _ in range(rng.randint(3, 20))]
        response = [rng.randrange(1, 97) for _ in range([1, 60, 2, 45, 3, 30, 5, 50][i % 8])]
        out.append(EncodedExample(prompt + response, [IGNORE] * len(prompt) + response, f"ex{i}"))
    return out


def grads_after(model: DecoderLM, batches) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    stats = train_step(model, batches, Precision("fp32", torch.device("cpu")))
    return stats.loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a: dict, b: dict, rtol: float) -> None:
    for name in a:
        scale = a[name].abs().max().clamp_min(1e-12)
        err = (a[name] - b[name]).abs().max() / scale
        assert err < rtol, f"{name}: relative difference {err:.2e}"


@pytest.fixture(params=FAMILIES)
def model(request) -> DecoderLM:
    return tiny_lm(request.param).double()  # fp64 so that the comparisons test the math, not rounding


@pytest.mark.parametrize("strategy", ["packed", "grouped"])
def test_accumulation_invariance(model, strategy):
    exs = examples_of_varied_lengths()
    lengths = [len(e) for e in exs]
    results = []
    for size, accumulation in [(8, 1), (2, 4)]:
        cfg = BatchConfig(strategy=strategy, size=size, unit="examples", accumulation=accumulation)
        plan = plan_run(lengths, cfg, seed=3, epochs=1)
        assert len(plan) == 1 and sorted(i for m in plan.steps[0] for i in m) == list(range(8))
        results.append(grads_after(model, step_batches(plan, 0, exs, cfg, 128, PAD)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    assert_same(grads_a, grads_b, 1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_accumulation_invariance_fp32(family):
    """In fp32 the two splits agree within 1e-6 relative."""
    model = tiny_lm(family)
    exs = examples_of_varied_lengths()
    one = grads_after(model, [make_batch(exs, "packed", 128, PAD)])
    four = grads_after(model, [make_batch(exs[i : i + 2], "packed", 128, PAD) for i in range(0, 8, 2)])
    assert one[0] == pytest.approx(four[0], rel=1e-6)
    assert_same(one[1], four[1], 1e-5)  # max-abs-relative over every tensor; mean error is ~1e-7
    diffs = [((one[1][n] - four[1][n]).norm() / one[1][n].norm()).item() for n in one[1]]
    assert max(diffs) < 1e-6


def test_normalized_by_label_tokens_of_whole_step(model):
    """Sum over every label token of the step / their count: not a mean of micro-batch means."""
    exs = examples_of_varied_lengths()
    batches = [make_batch([e], "grouped", 128, PAD) for e in exs]
    loss, _ = grads_after(model, batches)
    with torch.no_grad():
        sums = [float(reference_loss_sum(model(b.input_ids), model.head_weight, b.targets)) for b in batches]
    count = sum(b.n_label_tokens for b in batches)
    assert count == sum(e.n_label_tokens for e in exs)  # every response token is predicted once
    assert loss == pytest.approx(sum(sums) / count, rel=1e-12)


def test_packed_equals_unpacked(model):
    exs = examples_of_varied_lengths()
    packed = make_batch(exs, "packed", 128, PAD)
    assert packed.input_ids.shape[0] < len(exs)  # several examples really share rows
    unpacked = make_batch(exs, "grouped", 128, PAD)
    loss_p, grads_p = grads_after(model, [packed])
    loss_u, grads_u = grads_after(model, [unpacked])
    assert loss_p == pytest.approx(loss_u, rel=1e-12)
    assert_same(grads_p, grads_u, 1e-10)


def test_loss_matches_plain_full_logits_cross_entropy(model):
    exs = examples_of_varied_lengths()
    batch = make_batch(exs, "grouped", 128, PAD)
    loss, grads = grads_after(model, [batch])
    model.zero_grad(set_to_none=True)
    logits = model.lm_head(model(batch.input_ids))
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-12)
    assert_same({n: p.grad for n, p in model.named_parameters()}, grads, 1e-10)


def test_activation_checkpointing_gives_the_same_gradients(model):
    batch = make_batch(examples_of_varied_lengths(), "packed", 128, PAD)
    model.train()
    plain = grads_after(model, [batch])
    model.activation_checkpointing = True
    recomputed = grads_after(model, [batch])
    assert plain[0] == recomputed[0]
    assert_same(plain[1], recomputed[1], 1e-12)
