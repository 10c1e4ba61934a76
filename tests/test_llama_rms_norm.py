"""The Llama family's RMSNorm with its gradient written out (`qatune.model.llama._RMSNorm`, taken
on a CPU when a gradient is needed) against torch's `rms_norm` through autograd: the same
output bit for bit, the same gradients, and less kept for backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qatune.model import llama
from qatune.model.llama import RMSNorm


def test_gradient_is_exact_in_fp64():
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(24, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: llama._RMSNorm.apply(a, b, 1e-6), (x, w))


def test_fp32_output_is_torchs_bit_for_bit_and_gradients_agree():
    torch.manual_seed(0)
    x = torch.randn(3, 200, 576) * 3
    w = torch.rand(576) + 0.5
    g = torch.randn(3, 200, 576)
    ours, theirs = RMSNorm(576, 1e-5), RMSNorm(576, 1e-5)
    for norm in (ours, theirs):
        norm.weight.data.copy_(w)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo = ours(xo)
    yt = F.rms_norm(xt, (576,), theirs.weight, 1e-5)  # torch's, through autograd
    assert torch.equal(yo, yt)
    yo.backward(g)
    yt.backward(g)
    torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-4)


def test_keeps_only_its_input_and_one_rsqrt_per_row():
    x = torch.randn(4, 64, requires_grad=True)
    norm = RMSNorm(64, 1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()  # the input itself, no normalized copy
    assert sorted(t.numel() for t in saved if t.numel() != x.numel()) == [4, 64]  # r per row; the weight


def test_without_a_gradient_torchs_kernel_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(llama._RMSNorm, "apply", lambda *a: calls.append(a))
    with torch.no_grad():
        RMSNorm(8, 1e-5)(torch.randn(2, 8))
    assert not calls
