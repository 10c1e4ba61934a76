"""The chunked per-token log-prob primitive against full-logits fp64 log_softmax."""

from __future__ import annotations

import pytest
import torch
from tests.train_helpers import sequence_logprobs

from qatune.data.example import IGNORE
from qatune.kernels.logprobs import segment_sum, token_logprobs


def reference(h, w, t):
    logp_all = torch.log_softmax(h @ w.t(), dim=-1)
    logp = logp_all.gather(1, t[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def leaves(*tensors):
    return [x.detach().clone().requires_grad_() for x in tensors]


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_logprobs_entropy_and_grads_equal_full_logits(chunk):
    torch.manual_seed(0)
    N, V, d = 23, 300, 16
    h, w = torch.randn(N, d, dtype=torch.float64), torch.randn(V, d, dtype=torch.float64)
    t = torch.randint(0, V, (N,))
    g_logp, g_ent = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)

    h1, w1 = leaves(h, w)
    logp, ent = token_logprobs(h1, w1, t, chunk_size=chunk, with_entropy=True)
    h2, w2 = leaves(h, w)
    ref_logp, ref_ent = reference(h2, w2, t)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-10, atol=1e-10)

    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    ((ref_logp * g_logp).sum() + (ref_ent * g_ent).sum()).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_one_output_alone_gets_its_own_gradient(which):
    torch.manual_seed(1)
    h, w = torch.randn(9, 8, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)
    t = torch.randint(0, 40, (9,))
    h1, w1 = leaves(h, w)
    logp, ent = token_logprobs(h1, w1, t, chunk_size=4, with_entropy=True)
    h2, w2 = leaves(h, w)
    ref_logp, ref_ent = reference(h2, w2, t)
    (logp if which == "logp" else ent).pow(2).sum().backward()
    (ref_logp if which == "logp" else ref_ent).pow(2).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_nothing_rows_by_vocab_is_kept_for_backward():
    N, V, d = 64, 1000, 8
    h = torch.randn(N, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        logp, ent = token_logprobs(h, w, torch.randint(0, V, (N,)), chunk_size=16, with_entropy=True)
    assert saved, "the hook saw the saved tensors"
    assert max(saved) <= V * d  # the weight itself; never N x V
    (logp.sum() + ent.sum()).backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape


def test_no_grad_saves_nothing_and_matches():
    torch.manual_seed(2)
    h, w, t = torch.randn(7, 8), torch.randn(30, 8), torch.randint(0, 30, (7,))
    with torch.no_grad():
        logp = token_logprobs(h.requires_grad_(), w, t)
    assert logp.grad_fn is None
    torch.testing.assert_close(logp, reference(h.detach(), w, t)[0])


def test_bf16_matmuls_stay_close_and_fp32_out():
    torch.manual_seed(0)
    h, w = torch.randn(64, 32), torch.randn(500, 32) * 0.1
    t = torch.randint(0, 500, (64,))
    full = token_logprobs(h, w, t)
    half = token_logprobs(h, w, t, compute_dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=2e-2, atol=2e-2)


def test_sequence_logprobs_sum_labelled_positions_per_segment():
    torch.manual_seed(3)
    B, T, d, V = 2, 6, 8, 50
    hidden = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    targets[0, :2] = IGNORE
    targets[1, 4:] = IGNORE
    segments = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 9, 9]])  # 9: unlabelled, ignored
    got = sequence_logprobs(hidden, w, targets, segments, 3, chunk_size=3)
    full = torch.log_softmax(hidden @ w.t(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    want = torch.stack([full[0, 2:3].sum(), full[0, 3:].sum(), full[1, :4].sum()])
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert hidden.grad[1, 4:].abs().sum() == 0 and hidden.grad[0, :2].abs().sum() == 0


def test_segment_sum():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    out = segment_sum(v, torch.tensor([2, 0, 2, 0]), 3)
    assert out.tolist() == [6.0, 0.0, 4.0]
    (out * torch.tensor([1.0, 10.0, 100.0])).sum().backward()
    assert v.grad.tolist() == [100.0, 1.0, 100.0, 1.0]


def test_group_chunks_hold_whole_groups():
    from qatune.kernels.logprobs import group_chunks

    assert group_chunks([0, 3, 5, 9, 10], 5) == [(0, 5), (5, 10)]
    assert group_chunks([0, 7, 8], 5) == [(0, 7), (7, 8)]  # a group longer than a chunk is its own chunk
    assert group_chunks([0, 2, 4], 100) == [(0, 4)]
    assert group_chunks([0], 4) == []


@pytest.mark.parametrize("chunk", [1, 6, 1000])
def test_fused_loss_equals_the_general_primitive(chunk):
    """A pairwise loss over groups of rows (DPO's shape): value and gradients as through
    token_logprobs + autograd, for chunks of one group, a few groups, or everything."""
    from qatune.kernels.logprobs import fused_logprob_loss

    torch.manual_seed(4)
    lengths = [3, 2, 4, 1, 2, 5]  # sequences; groups are pairs (0, 1), (2, 3), (4, 5)
    seq = torch.repeat_interleave(torch.arange(6), torch.tensor(lengths))
    N, V, d = len(seq), 60, 8
    h, w = torch.randn(N, d, dtype=torch.float64), torch.randn(V, d, dtype=torch.float64)
    t = torch.randint(0, V, (N,))
    bounds = [0, 5, 10, 17]

    def pair_loss(seq_logp):
        return -torch.nn.functional.logsigmoid(0.3 * (seq_logp[0::2] - seq_logp[1::2])).sum()

    def loss_fn(logp, start, end):
        s = seq[start:end]
        return pair_loss(segment_sum(logp, s - s[0], int(s[-1] - s[0]) + 1))

    h1, w1 = leaves(h, w)
    fused = fused_logprob_loss(h1, w1, t, bounds, loss_fn, chunk_size=chunk)
    h2, w2 = leaves(h, w)
    general = pair_loss(segment_sum(token_logprobs(h2, w2, t), seq, 6))
    torch.testing.assert_close(fused, general)
    (3.0 * fused).backward()
    (3.0 * general).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


def test_fused_loss_can_add_its_weight_gradient_into_grad():
    """weight_grad_into_grad: dL/dW lands in `w.grad` (added to what is there) instead of coming
    back through autograd, where a tied embedding's sparse gradient is then added in place."""
    from qatune.kernels.logprobs import fused_logprob_loss

    torch.manual_seed(5)
    h, w = torch.randn(7, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    t = torch.randint(0, 30, (7,))
    ids = torch.tensor([3, 3, 11])
    loss_fn = lambda logp, start, end: (logp * torch.linspace(-1, 1, end - start, dtype=logp.dtype)).sum()  # noqa: E731

    def run(into_grad: bool):
        h1, w1 = leaves(h, w)
        w1.grad = torch.ones_like(w1)  # an earlier micro-batch's gradient
        emb = torch.nn.functional.embedding(ids, w1, sparse=into_grad).sum()
        (
            2.0 * fused_logprob_loss(h1, w1, t, [0, 3, 7], loss_fn, chunk_size=4, weight_grad_into_grad=into_grad) + emb
        ).backward()
        return h1.grad, w1.grad

    (gh, gw), (gh_ref, gw_ref) = run(True), run(False)
    assert gw.layout == torch.strided
    torch.testing.assert_close(gh, gh_ref)
    torch.testing.assert_close(gw, gw_ref)
