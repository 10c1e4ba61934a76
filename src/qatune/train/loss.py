"""Response-only cross-entropy with the LM head applied only at labelled positions, in chunks.

Only positions whose target is a label (response tokens and their EOS) are gathered from the
hidden states; the tied LM head and the softmax run over those rows `chunk_size` at a time. The
gradient of each chunk is computed in the same pass and the chunk's logits are freed at once, so
no `tokens x vocab` tensor — for GPT-2, 50,257 floats per token — ever lives beyond one chunk,
neither in forward nor kept for backward. This is the "fused linear cross-entropy" idea.

The function returns the *sum* of token losses; the caller divides by the number of label
tokens in the whole optimizer step (all micro-batches, all ranks), so that micro-batch x
accumulation gives exactly the large-batch loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qatune.data.example import IGNORE

DEFAULT_CHUNK = 2048


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, t_i), computing dL/dh and dL/dW chunk by chunk during forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, compute_dtype: torch.dtype):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums: fp32 at least
        n = h.shape[0]
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = None  # written by the first chunk's matmul: no full-size zero fill
        w = weight.to(compute_dtype)
        # One logits buffer for every chunk of this call (the last chunk uses its first rows).
        buf = torch.empty(min(chunk_size, n), w.shape[0], dtype=acc, device=h.device)
        for start in range(0, n, chunk_size):
            hc = h[start : start + chunk_size].to(compute_dtype)
            tc = targets[start : start + chunk_size]
            logp = head_log_softmax(hc, w, buf[: hc.shape[0]])
            loss -= logp.gather(1, tc[:, None]).sum()
            if not (want_h or want_w):
                continue
            dlogits = softmax_minus_onehot_(logp, tc).to(compute_dtype)
            if want_h:
                _mm_into(grad_h[start : start + chunk_size], dlogits, w)
            if want_w:
                grad_w = _addmm_acc(grad_w, dlogits.t(), hc, acc)
            del dlogits
        if grad_w is None and want_w:  # no labelled rows at all
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # The gradients were computed in forward; scale them in place (no second full-size
        # buffer). A second backward through the same graph fails on the saved tensors' version
        # check instead of silently scaling twice.
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h.mul_(grad_loss.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def head_log_softmax(hc: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log_softmax(hc @ w^T) over the vocabulary, written into `out` (fp32 at least).

    The matmul writes straight into `out` when the dtypes agree, and the softmax runs in place:
    one pass over each row while it is in cache, instead of a max, a sum and two full-size temps.
    """
    if out.dtype == hc.dtype:
        torch.mm(hc, w.t(), out=out)
    else:
        out.copy_(hc @ w.t())  # bf16/fp16 matmul, softmax in fp32
    return torch.log_softmax(out, dim=-1, out=out)


def softmax_minus_onehot_(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d(sum CE)/d(logits) = softmax - one_hot(targets), computed in place over log-probs."""
    probs = logp.exp_()
    probs.view(-1)[torch.arange(targets.shape[0], device=targets.device) * probs.shape[1] + targets] -= 1.0
    return probs


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _addmm_acc(acc_tensor: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """acc_tensor + a @ b, accumulated in `acc` precision; the first call allocates."""
    if acc_tensor is None:
        part = a @ b
        return part if part.dtype == acc else part.to(acc)
    if a.dtype == acc:
        return acc_tensor.addmm_(a, b)
    return acc_tensor.add_(a @ b)


def select_labelled(
    hidden: torch.Tensor, targets: torch.Tensor, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden rows (N, d) and targets (N,) of positions that carry a label; `index` (their
    flat positions, known when the batch was built) avoids a boolean mask's device sync."""
    if index is not None:
        return hidden.flatten(0, -2).index_select(0, index), targets.flatten().index_select(0, index)
    keep = targets != IGNORE
    return hidden[keep], targets[keep]


def response_loss_sum(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    compute_dtype: torch.dtype | None = None,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over labelled positions, number of labelled positions).

    hidden: (..., d) final hidden states; targets: (...) shifted targets, IGNORE where no loss.
    compute_dtype: dtype of the head's matmuls (bf16/fp16 under mixed precision); the softmax and
    the sum are always fp32.
    index: flat positions of the labelled targets (`Batch.label_index`), when known.
    """
    h, t = select_labelled(hidden, targets, index)
    if compute_dtype is None:
        compute_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    if not torch.is_grad_enabled():
        # needs_input_grad ignores no_grad mode: detach so eval does not compute gradients.
        h, lm_weight = h.detach(), lm_weight.detach()
    with torch.autocast(h.device.type, enabled=False):
        loss = _LinearCrossEntropySum.apply(h, lm_weight, t, chunk_size, compute_dtype)
    return loss, int(t.numel())


def reference_loss_sum(hidden: torch.Tensor, lm_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain way, full logits and `cross_entropy(ignore_index=-100)`: for tests only."""
    logits = F.linear(hidden, lm_weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum")
