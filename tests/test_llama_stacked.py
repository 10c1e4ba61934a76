"""The two autograd functions of a Llama block's stacked path under autocast
(`qatune.model.llama.RotateStacked`, `SwiGLUStacked`) against the plain ops they replace: the
same values and gradients, and the whole model under bf16 autocast taking them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qatune.model import llama
from qatune.model.llama import Llama, LlamaConfig, RotateStacked, SwiGLUStacked, rotate

N_Q, N_KV, D = 6, 2, 16


def _cos_sin(tokens: int, dtype=torch.float32):
    angles = torch.rand(1, tokens, D // 2, dtype=torch.float64) * 40  # far positions: every sign of sin/cos
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def test_rotation_gradient_is_the_rotations_transpose_in_fp64():
    qkv = torch.randn(1, 5, N_Q + 2 * N_KV, D, dtype=torch.float64, requires_grad=True)
    cos, sin = _cos_sin(5, torch.float64)
    assert torch.autograd.gradcheck(lambda t: RotateStacked.apply(t, cos, sin, N_Q, N_KV), (qkv,))


def test_bf16_rotation_equals_rotate_then_cast_and_its_gradient_is_closer_to_fp64():
    """Forward: `rotate` in fp32 and the cast to bf16 attention makes, up to a last bit where a
    fused multiply-add rounds once (at most 1 in 1,000 values here). Backward: nearer the fp64
    gradient than autograd through `rotate`, which rounds each product to bf16 and then their sum."""
    torch.manual_seed(0)
    tokens = 300
    qkv = torch.randn(1, tokens, N_Q + 2 * N_KV, D).bfloat16().requires_grad_()
    cos, sin = _cos_sin(tokens)
    grads = [torch.randn(1, tokens, h, D).bfloat16() for h in (N_Q, N_KV, N_KV)]

    q, k, v = RotateStacked.apply(qkv, cos, sin, N_Q, N_KV)
    torch.autograd.backward([q, k, v], grads)
    fused_grad, qkv.grad = qkv.grad, None
    q0, k0 = (t.bfloat16() for t in rotate(qkv[..., : N_Q + N_KV, :], cos, sin).split((N_Q, N_KV), dim=-2))
    v0 = qkv[..., N_Q + N_KV :, :]
    torch.autograd.backward([q0, k0, v0], grads)

    for got, want in ((q, q0), (k, k0), (v, v0)):
        assert got.dtype == torch.bfloat16 and got.is_contiguous()
        assert (got != want).float().mean() <= 1e-3
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    exact = qkv.detach().double().requires_grad_()
    qt, kt = rotate(exact[..., : N_Q + N_KV, :], cos.double(), sin.double()).split((N_Q, N_KV), dim=-2)
    torch.autograd.backward([qt, kt, exact[..., N_Q + N_KV :, :]], [g.double() for g in grads])

    def error(g):
        return float((g.double() - exact.grad).norm() / exact.grad.norm())

    assert error(fused_grad) <= error(qkv.grad)


def test_swiglu_on_stacked_gate_up_equals_autograd_bit_for_bit():
    torch.manual_seed(0)
    h = torch.randn(2, 70, 2 * 48).bfloat16().requires_grad_()
    g = torch.randn(2, 70, 48).bfloat16()
    y = SwiGLUStacked.apply(h)
    y.backward(g)
    fused_grad, h.grad = h.grad, None
    gate, up = h.chunk(2, dim=-1)
    y0 = F.silu(gate) * up
    y0.backward(g)
    assert torch.equal(y, y0) and torch.equal(fused_grad, h.grad)
    h64 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUStacked.apply, (h64,))


def test_a_block_under_bf16_autocast_runs_both_and_saves_no_silu_output(monkeypatch):
    """The whole model under CPU autocast takes the two functions once per block, and the SwiGLU
    keeps gate | up and the product, not SiLU's output (what `qatune plan` counts)."""
    config = LlamaConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8, d_ff=48, vocab_size=64)
    model = Llama(config).train()
    calls = []
    for fn in (RotateStacked, SwiGLUStacked):
        apply = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, _f=apply, _n=fn.__name__: calls.append(_n) or _f(*a))
    ids = torch.randint(0, 64, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(ids)
    assert calls == ["RotateStacked", "SwiGLUStacked"] * config.n_layer
    model.lm_head(hidden).float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    monkeypatch.undo()

    saved = []  # element counts (a linear saves its input flattened to 2-d)

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    tokens = ids.numel()
    assert saved.count(tokens * 2 * config.d_ff) == config.n_layer  # gate | up, once per block
    assert saved.count(tokens * config.d_ff) == config.n_layer  # the product (down_proj's input), no SiLU output
    assert llama.stackable(torch.zeros(1), model.layers[0].mlp.gate_proj) is False  # outside autocast: plain ops
