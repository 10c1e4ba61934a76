"""Schedule, clipping and weight-decay groups against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qatune.model.gpt2 import GPT2, GPT2Config
from qatune.train.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    decay_split,
    finish_clip,
    lr_at,
)

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


def test_a_llamas_embedding_and_norms_are_not_decayed_its_untied_head_is():
    from tests.tiny_models import tiny_lm

    model = tiny_lm("llama")
    decay, no_decay = decay_split(model)
    assert "embed_tokens.weight" in no_decay and "norm.weight" in no_decay and "output.weight" in decay
    assert {n for n in decay if n.startswith("layers.0.")} == {
        f"layers.0.{m}.weight"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }


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


@pytest.mark.parametrize("norm_scale", [100.0, 0.01])  # clipped, and under the limit
def test_clip_folded_into_fused_adamw_matches_clipping_the_gradients(norm_scale):
    """With a fused AdamW the clip factor rides in the optimizer's grad_scale (no pass over the
    gradients): the update equals clipping the gradients first and stepping a plain AdamW."""
    torch.manual_seed(0)
    models = [GPT2(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=32)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    grads = [torch.randn_like(p) * norm_scale for p in models[0].parameters()]
    fused = build_optimizer(models[0], OptimConfig(lr=1e-2, fused=True))
    plain = build_optimizer(models[1], OptimConfig(lr=1e-2, fused=False))
    assert fused.param_groups[0]["fused"] and not plain.param_groups[0].get("fused")
    for _ in range(2):  # the second step checks the factor was removed after the first
        for model in models:
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
        folded = clip_gradients(models[0].parameters(), 1.0, fused)
        assert (getattr(fused, "grad_scale", None) is not None) == folded.clipped == (norm_scale > 1)
        if folded.clipped:  # the gradients themselves are left as they were
            assert torch.equal(next(models[0].parameters()).grad, grads[0])
        fused.step()
        finish_clip(fused)
        assert getattr(fused, "grad_scale", None) is None
        reference = torch.nn.utils.clip_grad_norm_(list(models[1].parameters()), 1.0)
        plain.step()
        assert folded.grad_norm == pytest.approx(float(reference), rel=1e-5)
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            # fused vs plain AdamW on random (never near-zero) gradients: the update (lr 1e-2) agrees to
            # fp32 rounding, 1e-6 absolute is 1e-4 of it (measured 6e-8)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
