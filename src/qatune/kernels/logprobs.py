"""Per-token log-probabilities (and entropies) of target tokens through the tied LM head, in chunks.

    logp = token_logprobs(h, lm_weight, targets)                      # (N,), differentiable
    logp, ent = token_logprobs(h, lm_weight, targets, with_entropy=True)
    seq_logp = segment_sum(logp, seq_of_row, n_seqs)                  # per-sequence sums

The general primitive behind every method that needs log pi(token) rather than a cross-entropy
sum: DPO (sequence log-probs of chosen and rejected responses), reward-model evaluation, PPO/GRPO
(per-token ratios, KL to the reference, entropy bonus).

No `rows x vocab` tensor outlives one chunk (one buffer serves every chunk), and the chunk body
is the one of `qatune.kernels.loss` (log-softmax in place, gradients summed without a zero-filled
vocab x d buffer). The forward keeps only the rows' log-probs (and entropy); the backward
recomputes each chunk's log-softmax of z = h W^T and applies the upstream gradient per token:

    d log p_t / d z_j = 1[j = t] - p_j
    d H / d z_j       = -p_j (log p_j + H)           (H = -sum_j p_j log p_j)

so dL/dz = g_logp (onehot - p) - g_H p (log p + H), then dL/dh = dz W and dL/dW = dz^T h. That is
four head matmuls per row in a training step (forward, recompute, two gradients).

`fused_logprob_loss` needs three: for a loss that is a sum over groups of rows (DPO: a pair's
chosen and rejected responses; GRPO: any rows), each chunk holds whole groups, so the chunk's
logits give its groups' losses and dL/dlogp per row while the logits still exist, and the gradients
are formed in the same pass — as `qatune.kernels.loss` does for SFT's cross-entropy. On the LM head
of a DPO step (d=256, 2,233 response rows, 1 CPU thread) it was measured 1.44x faster than the
general primitive: one matmul and one log-sum-exp over the vocabulary fewer
(`benchmarks/dpo_head.py`).
"""

from __future__ import annotations

import torch

from qatune.kernels.loss import (
    DEFAULT_CHUNK,
    HeadGradients,
    head_backward,
    head_inputs,
    head_log_softmax,
    logits_buffer,
    save_head_gradients,
    softmax_minus_onehot_,
)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T)[t] per row, and optionally the softmax entropy per row."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, compute_dtype: torch.dtype, with_entropy: bool):
        ctx.set_materialize_grads(False)  # an unused output (entropy for logging) costs no backward work
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums: fp32 at least
        n = h.shape[0]
        logp = torch.empty(n, dtype=acc, device=h.device)
        entropy = torch.empty(n, dtype=acc, device=h.device) if with_entropy else None
        w = weight.to(compute_dtype)
        buf = logits_buffer(n, chunk_size, w, acc)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            log_p = head_log_softmax(h[start:end].to(compute_dtype), w, buf[: end - start])
            logp[start:end] = log_p.gather(1, targets[start:end, None]).squeeze(1)
            if with_entropy:  # H = -sum_j p_j log p_j
                entropy[start:end] = -log_p.exp().mul_(log_p).sum(-1)
        ctx.save_for_backward(h, weight, targets, entropy if with_entropy else logp)
        ctx.chunk_size, ctx.compute_dtype, ctx.acc = chunk_size, compute_dtype, acc
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        h, weight, targets, entropy = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_entropy is None) or not (want_h or want_w):
            return None, None, None, None, None, None
        acc, cdt = ctx.acc, ctx.compute_dtype
        grads = HeadGradients(h, weight, want_h, want_w, acc)
        w = weight.to(cdt)
        buf = logits_buffer(h.shape[0], ctx.chunk_size, w, acc)
        for start in range(0, h.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, h.shape[0])
            hc = h[start:end].to(cdt)
            log_p = head_log_softmax(hc, w, buf[: end - start])  # recomputed, in the reused buffer
            g = grad_logp[start:end].to(acc)[:, None] if grad_logp is not None else 0.0
            if grad_entropy is None:
                dz = log_p.exp_().mul_(-g)  # -g p, in place
            else:
                # -p (g + g_H (log p + H)), with p the only extra chunk-sized tensor
                p = log_p.exp()
                g_h = grad_entropy[start:end].to(acc)[:, None]
                dz = log_p.add_(entropy[start:end, None]).mul_(g_h).add_(g).mul_(p).neg_()
                del p
            if grad_logp is not None:
                dz[torch.arange(end - start, device=dz.device), targets[start:end]] += g.squeeze(1)
            grads.add(start, dz, hc, w)
        grad_h, grad_w = grads.result()
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    compute_dtype: torch.dtype | None = None,
    with_entropy: bool = False,
):
    """log p(targets[i] | hidden[i]) for rows hidden (N, d) under the head lm_weight (V, d): (N,),
    or (logp, entropy) with `with_entropy`. Both are fp32 (at least) and differentiable in hidden
    and lm_weight.

    compute_dtype: dtype of the head's matmuls (bf16/fp16 under mixed precision; default the
    autocast dtype when autocast is on, else hidden's dtype); the softmax is always fp32.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        shapes = f"{tuple(hidden.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"token_logprobs wants rows (N, d) and targets (N,), got {shapes}")
    hidden, lm_weight, compute_dtype = head_inputs(hidden, lm_weight, compute_dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedTokenLogprobs.apply(hidden, lm_weight, targets, chunk_size, compute_dtype, with_entropy)


class _FusedLogprobLoss(torch.autograd.Function):
    """sum over chunks of loss_fn(log p of the chunk's rows), gradients formed during the forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunks, loss_fn, compute_dtype, into_grad: bool = False):
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.promote_types(compute_dtype, torch.float32)
        loss = torch.zeros((), dtype=acc, device=h.device)
        grads = HeadGradients(h, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1], acc)
        w = weight.to(compute_dtype)
        buf = logits_buffer(h.shape[0], max((end - start for start, end in chunks), default=0), w, acc)
        for start, end in chunks:
            hc = h[start:end].to(compute_dtype)
            log_p = head_log_softmax(hc, w, buf[: end - start])
            tok = log_p.gather(1, targets[start:end, None]).squeeze(1)
            if not want_grad:
                loss += loss_fn(tok, start, end).detach()
                continue
            with torch.enable_grad():  # a small graph over this chunk's log-probs only
                tok = tok.detach().requires_grad_()
                part = loss_fn(tok, start, end)
                (g,) = torch.autograd.grad(part, tok)
            loss += part.detach()
            # dL/dz = g (onehot - p) = -g (p - onehot), in place over the chunk's log-probs
            grads.add(start, softmax_minus_onehot_(log_p, targets[start:end]).mul_(-g[:, None]), hc, w)
        save_head_gradients(ctx, grads, weight, into_grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return *head_backward(ctx, grad_loss), None, None, None, None, None


def group_chunks(bounds: list[int], chunk_size: int) -> list[tuple[int, int]]:
    """Row ranges of consecutive whole groups (group k = rows bounds[k]:bounds[k+1]), each at most
    chunk_size rows unless a single group is longer."""
    chunks: list[tuple[int, int]] = []
    start = bounds[0]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - start > chunk_size and a > start:
            chunks.append((start, a))
            start = a
    if bounds[-1] > start:
        chunks.append((start, bounds[-1]))
    return chunks


def fused_logprob_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    bounds: list[int],
    loss_fn,
    chunk_size: int = DEFAULT_CHUNK,
    compute_dtype: torch.dtype | None = None,
    weight_grad_into_grad: bool = False,
) -> torch.Tensor:
    """sum_k loss_k(log p of group k's rows) as one scalar, differentiable in hidden and lm_weight.

    Rows hidden (N, d) and targets (N,) are ordered by group; group k is rows bounds[k]:bounds[k+1]
    and a loss may only couple rows of the same group. `loss_fn(logp, start, end)` gets the
    log-probs of rows start:end (whole groups) and returns their loss as a scalar built with torch
    ops (its gradient in logp is taken by autograd); it may record detached values for metrics.
    weight_grad_into_grad: as `qatune.kernels.loss.rows_loss_sum` (for a tied embedding with a
    sparse gradient).
    """
    hidden, lm_weight, compute_dtype = head_inputs(hidden, lm_weight, compute_dtype)
    chunks = group_chunks(list(bounds), chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):
        args = (hidden, lm_weight, targets, chunks, loss_fn, compute_dtype, weight_grad_into_grad)
        return _FusedLogprobLoss.apply(*args)


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, n_segments: int) -> torch.Tensor:
    """out[s] = sum of values[i] with segment_ids[i] == s, for s < n_segments (differentiable)."""
    out = values.new_zeros(n_segments)
    return out.index_add(0, segment_ids, values)
