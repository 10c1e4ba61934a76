"""The LM-head work of one DPO step: the general chunked log-prob primitive vs a fused variant.

General (`qatune.kernels.logprobs.token_logprobs`): the forward keeps each row's log-sum-exp; the
backward recomputes each chunk's logits and applies the DPO gradient per token. Four head matmuls
per response token (forward, recompute, dL/dh, dL/dW).

Fused (`qatune.kernels.logprobs.fused_logprob_loss`): chunks of whole pairs; a chunk's logits give
its sequences' log-probs, hence the DPO loss of its pairs and dL/dlogp per sequence, while the
logits are still there, so the gradients are formed in the same pass (as `qatune.kernels.loss` does
for SFT). Three head matmuls per response token.

Both are timed on the same rows (hidden states of the response tokens of `--pairs` pairs), same
thread count, fp32, and must agree on loss and gradients. Prints a table and one JSON line.

    python -m benchmarks.dpo_head --d 256 --pairs 8 --response 128
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import emit, quiet
from qatune.kernels.logprobs import fused_logprob_loss, segment_sum, token_logprobs


def general(h, w, t, seq, n_seq, ref, beta, chunk):
    """DPO sigmoid loss sum through the general primitive; returns (loss, grad_h, grad_w)."""
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    logp = segment_sum(token_logprobs(h, w, t, chunk), seq, n_seq)
    chosen, rejected = logp[0::2] - ref[0::2], logp[1::2] - ref[1::2]
    loss = -F.logsigmoid(beta * (chosen - rejected)).sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def fused(h, w, t, seq, n_seq, ref, beta, chunk):
    """The same loss through `fused_logprob_loss`, chunks of whole pairs (rows sorted by seq)."""
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    starts = torch.searchsorted(seq, torch.arange(0, n_seq, 2)).tolist()

    def pair_loss(logp, start, end):
        s = seq[start:end] - seq[start]
        seq_logp = segment_sum(logp, s, int(s[-1]) + 1) - ref[int(seq[start]) : int(seq[end - 1]) + 1]
        return -F.logsigmoid(beta * (seq_logp[0::2] - seq_logp[1::2])).sum()

    loss = fused_logprob_loss(h, w, t, [*starts, h.shape[0]], pair_loss, chunk)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def timed(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--response", type=int, default=128, help="response tokens per sequence (mean)")
    p.add_argument("--chunk", type=int, default=2048, help="rows per chunk (general)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    quiet(args.threads)
    torch.manual_seed(0)
    n_seq = 2 * args.pairs
    lengths = torch.randint(args.response // 2, args.response * 3 // 2 + 1, (n_seq,))
    seq = torch.repeat_interleave(torch.arange(n_seq), lengths)
    N = int(lengths.sum())
    h = torch.randn(N, args.d)
    w = torch.randn(args.vocab, args.d) * 0.02
    t = torch.randint(0, args.vocab, (N,))
    ref = torch.randn(n_seq) * 10 - 200
    beta = 0.1

    t_gen, (l1, gh1, gw1) = timed(lambda: general(h, w, t, seq, n_seq, ref, beta, args.chunk), args.repeats)
    t_fus, (l2, gh2, gw2) = timed(lambda: fused(h, w, t, seq, n_seq, ref, beta, args.chunk), args.repeats)
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gh1, gh2, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gw1, gw2, rtol=1e-3, atol=1e-5)
    row = {
        "bench": "dpo_head",
        "d": args.d,
        "vocab": args.vocab,
        "pairs": args.pairs,
        "rows": N,
        "threads": args.threads,
        "general_s": round(t_gen, 4),
        "fused_s": round(t_fus, 4),
        "fused_speedup": round(t_gen / t_fus, 3),
    }
    print(f"{'rows':>6} {'d':>5} {'general s':>10} {'fused s':>10} {'speedup':>8}")
    print(f"{N:>6} {args.d:>5} {t_gen:>10.3f} {t_fus:>10.3f} {t_gen / t_fus:>8.2f}x")
    emit(row)


if __name__ == "__main__":
    main()
