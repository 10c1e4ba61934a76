"""Schedule, clipping and weight-decay groups against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qatune.model.gpt2 import GPT2, GPT2Config
from qatune.train.optim import OptimConfig, build_optimizer, build_scheduler, clip_gradients, decay_split, lr_at

CFG = OptimConfig(lr=1e-3, lr_min=1e-4, warmup_steps=4, weight_decay=0.1)


def test_warmup_is_linear_from_lr_over_warmup():
    assert [lr_at(s, CFG, 14) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_cosine_from_lr_to_lr_min():
    # 14 steps: warmup 0..3, cosine over steps 4..13 (9 intervals), ending exactly at lr_min.
    total = 14
    assert lr_at(4, CFG, total) == pytest.approx(1e-3)
    assert lr_at(13, CFG, total) == pytest.approx(1e-4)
    # halfway (step 4 + 4.5 is not an integer; check step 7: progress 3/9)
    expected = 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 3 / 9))
    assert lr_at(7, CFG, total) == pytest.approx(expected)
    assert lr_at(100, CFG, total) == pytest.approx(1e-4)  # past the end it stays at lr_min


def test_scheduler_drives_optimizer_lr():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, CFG)
    sched = build_scheduler(opt, CFG, 14)
    seen = []
    for _ in range(14):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, CFG, 14) for s in range(14)])


def test_no_decay_on_biases_layernorm_and_embeddings():
    model = GPT2(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=11))
    decay, no_decay = decay_split(model)
    assert decay == ["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"]
    assert set(no_decay) == {n for n, _ in model.named_parameters()} - set(decay)
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "h.0.attn.c_attn.bias"} <= set(no_decay)
    opt = build_optimizer(model, CFG)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_decay_only_shrinks_matrices_by_lr_times_wd():
    """With zero gradients AdamW's update is the decay alone: w <- w * (1 - lr * wd)."""
    model = GPT2(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=11))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=0.5, weight_decay=0.2, warmup_steps=0))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        is_layer_matrix = n.startswith("h.") and n.endswith(".weight") and p.ndim == 2
        factor = 1 - 0.5 * 0.2 if is_layer_matrix else 1.0
        assert torch.allclose(p, before[n] * factor, atol=0), n


def test_clip_by_global_norm_reports_pre_clip_norm():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])  # global norm 13
    result = clip_gradients([a, b], max_norm=1.0)
    assert result.grad_norm == pytest.approx(13.0) and result.clipped
    assert a.grad.tolist() == pytest.approx([3 / 13, 4 / 13], rel=1e-5)
    assert b.grad.tolist() == pytest.approx([12 / 13], rel=1e-5)
    a.grad, b.grad = torch.tensor([0.3, 0.4]), torch.tensor([0.0])
    result = clip_gradients([a, b], max_norm=1.0)
    assert result.grad_norm == pytest.approx(0.5) and not result.clipped
    assert a.grad.tolist() == pytest.approx([0.3, 0.4])
