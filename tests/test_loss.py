"""The chunked response-only loss against a plain full-logits cross-entropy."""

from __future__ import annotations

import pytest
import torch

from qatune.data.example import IGNORE
from qatune.kernels.loss import reference_loss_sum, response_loss_sum


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_and_grads_equal_full_logits(chunk):
    torch.manual_seed(0)
    V, d = 300, 16
    h1 = torch.randn(3, 11, d, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (3, 11))
    targets[torch.rand(3, 11) < 0.4] = IGNORE
    h2, w2 = h1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()

    loss, n = response_loss_sum(h1, w1, targets, chunk_size=chunk)
    ref = reference_loss_sum(h2, w2, targets)
    assert n == int((targets != IGNORE).sum())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    (2.5 * loss).backward()
    (2.5 * ref).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-9)


def test_no_grad_path_and_no_labels():
    h, w = torch.randn(2, 5, 8), torch.randn(50, 8)
    with torch.no_grad():
        loss, n = response_loss_sum(h, w, torch.full((2, 5), IGNORE))
    assert n == 0 and loss.item() == 0.0


def test_bf16_compute_is_close_to_fp32():
    torch.manual_seed(0)
    h, w = torch.randn(64, 32), torch.randn(500, 32) * 0.1
    t = torch.randint(0, 500, (64,))
    full, _ = response_loss_sum(h, w, t)
    half, _ = response_loss_sum(h, w, t, compute_dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=1e-2, atol=0)


def test_no_grad_mode_computes_no_gradients(monkeypatch):
    """Eval runs under no_grad: the fused loss must not spend a matmul per chunk on gradients."""
    import qatune.kernels.loss as loss_mod

    seen = []
    real = loss_mod._LinearCrossEntropySum.forward

    def spy(ctx, *args):
        seen.append(tuple(ctx.needs_input_grad[:2]))
        return real(ctx, *args)

    monkeypatch.setattr(loss_mod._LinearCrossEntropySum, "forward", staticmethod(spy))
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    with torch.no_grad():
        response_loss_sum(h, w, torch.randint(0, 30, (4,)))
    response_loss_sum(h, w, torch.randint(0, 30, (4,)))
    assert seen == [(False, False), (True, True)]
