"""Gradient analysis on constructed cases, against direct computations."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from qatune.analysis.grads import (
    GradientMoments,
    fit_power_law,
    per_example_analysis,
    per_layer_step,
    segment_shares,
    segment_targets,
)
from qatune.data.example import IGNORE, EncodedExample
from qatune.train.grad_norms import layer_sq_norms


def examples(n: int, seed: int = 0) -> list[EncodedExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, r = rng.randint(2, 12), rng.randint(1, 20)
        ids = [rng.randrange(50000) for _ in range(p + r)]
        out.append(EncodedExample(ids, [IGNORE] * p + ids[p:]))
    return out


def direct_grad(model, ids, targets) -> torch.Tensor:
    """Plain full-logits loss (sum over labelled tokens) and loss.backward()."""
    model.zero_grad()
    logits = model.lm_head(model(torch.tensor([ids])))
    F.cross_entropy(logits[0], torch.tensor(targets), ignore_index=IGNORE, reduction="sum").backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def test_per_example_norms_equal_separate_backward_passes(tiny_model):
    exs = examples(8)
    result = per_example_analysis(tiny_model, exs, n_bins=0)
    for ex, sq_sum, sq_mean in zip(exs, result["sum"]["sq_norm"], result["mean"]["sq_norm"]):
        g = direct_grad(tiny_model.eval(), ex.input_ids, ex.shifted_targets())
        assert math.isclose(sq_sum, float(g.dot(g)), rel_tol=1e-4)
        assert math.isclose(sq_mean, float(g.dot(g)) / ex.n_label_tokens**2, rel_tol=1e-4)
    assert result["response_len"] == [e.n_label_tokens for e in exs]


def test_segment_shares_equal_two_separate_backward_passes(tiny_model):
    exs = examples(4, seed=1)
    got = segment_shares(tiny_model, exs)
    gp = gr = 0
    n_prompt = n_resp = 0
    for ex in exs:
        tp, tr = segment_targets(ex)
        gp = gp + direct_grad(tiny_model.eval(), ex.input_ids, tp)
        gr = gr + direct_grad(tiny_model.eval(), ex.input_ids, tr)
        n_prompt += sum(t != IGNORE for t in tp)
        n_resp += sum(t != IGNORE for t in tr)
    total = n_prompt + n_resp
    assert (got["instruction_tokens"], got["response_tokens"]) == (n_prompt, n_resp)
    assert math.isclose(got["instruction_grad_norm"], float(gp.norm()) / total, rel_tol=1e-4)
    assert math.isclose(got["response_grad_norm"], float(gr.norm()) / total, rel_tol=1e-4)
    assert math.isclose(got["cosine"], float(gp.dot(gr) / (gp.norm() * gr.norm())), rel_tol=1e-4, abs_tol=1e-6)


def test_segment_targets_split_every_next_token_once():
    ex = EncodedExample([10, 11, 12, 20, 21], [IGNORE, IGNORE, IGNORE, 20, 21])
    prompt, response = segment_targets(ex)
    assert prompt == [11, 12, IGNORE, IGNORE, IGNORE]
    assert response == [IGNORE, IGNORE, 20, 21, IGNORE]


def test_noise_scale_recovers_a_known_value():
    torch.manual_seed(0)
    D, sigma, B = 400, 0.5, 4000
    G = torch.randn(D)
    G = G / G.norm() * 2.0  # |G|^2 = 4
    m = GradientMoments()
    for _ in range(B):
        m.add(G + sigma * torch.randn(D))
    ns = m.noise_scale()
    assert ns.trace_sigma == pytest.approx(D * sigma**2, rel=0.03)  # 100
    assert ns.grad_sq == pytest.approx(4.0, rel=0.05)
    assert ns.b_simple == pytest.approx(25.0, rel=0.06)


def test_power_law_fit_recovers_slope_and_its_uncertainty():
    rng = random.Random(0)
    x = [rng.uniform(1, 1000) for _ in range(400)]
    y = [3.0 * xi**0.7 * math.exp(rng.gauss(0, 0.1)) for xi in x]
    fit = fit_power_law(x, y)
    assert fit.slope == pytest.approx(0.7, abs=3 * fit.slope_se)
    assert 0.001 < fit.slope_se < 0.02
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law([1, 2], [1, 2])


def test_per_layer_first_adam_step_moves_each_weight_by_lr(tiny_model):
    exs = examples(3, seed=2)
    rows = {r["layer"]: r for r in per_layer_step(tiny_model, exs, lr=1e-3)}
    assert set(rows) == {"embeddings", "h.0", "h.1", "ln_f"}
    # Adam's first step is lr * g/(|g|+eps): each parameter with a non-zero gradient moves by ~lr.
    n_moving = sum(p.numel() for n, p in tiny_model.named_parameters() if n.startswith("h.1."))
    assert rows["h.1"]["update_norm"] == pytest.approx(1e-3 * math.sqrt(n_moving), rel=0.02)
    assert rows["h.1"]["update_to_weight"] == pytest.approx(rows["h.1"]["update_norm"] / rows["h.1"]["weight_norm"])
    # the model itself is untouched
    assert all(p.grad is None for p in tiny_model.parameters())


def test_layer_grad_norms_group_by_block(tiny_model):
    tiny_model.lm_head(tiny_model(torch.tensor([[1, 2, 3]]))).sum().backward()
    norms = {k: math.sqrt(v) for k, v in layer_sq_norms(tiny_model).items()}
    direct = math.sqrt(
        sum(float(p.grad.pow(2).sum()) for n, p in tiny_model.named_parameters() if n.startswith("h.0."))
    )
    assert norms["h.0"] == pytest.approx(direct)
