"""The chunked LM-head loss on its own: qatune's kernel against the formulation it replaced.

Forward + backward of the response-only cross-entropy for N label rows of GPT-2's head
(d=256, V=50,257), as one SFT step runs it, in CPU seconds (best of `--repeat`), fp32 and bf16
compute:
- qatune: `qatune.kernels.loss.response_loss_sum` — one logits buffer for all chunks, log-softmax
  in place, dL/dlogits in place, grad_w written by the first chunk's matmul, the backward a
  scaling in place.
- previous: the kernel before (kept here as the baseline) — logsumexp, then sub_/exp_ over the
  logits, a zero-filled fp32 grad_w accumulated with +=, and a scaled copy of it in backward.
- full logits: `F.cross_entropy` over the whole logits (what `transformers` does), for scale.
All three must agree on the loss and the gradients (largest difference printed).

    python -m benchmarks.loss_kernel
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.harness import emit, quiet
from qatune.kernels.loss import reference_loss_sum, response_loss_sum


class _Previous(torch.autograd.Function):
    """The kernel as it was before (the baseline)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, compute_dtype):
        acc = torch.promote_types(compute_dtype, torch.float32)
        loss = torch.zeros((), dtype=acc)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=acc)
        w = weight.to(compute_dtype)
        for start in range(0, h.shape[0], chunk_size):
            hc = h[start : start + chunk_size].to(compute_dtype)
            tc = targets[start : start + chunk_size]
            logits = (hc @ w.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            dlogits = logits.sub_(lse[:, None]).exp_()
            dlogits[torch.arange(tc.shape[0]), tc] -= 1.0
            dlogits = dlogits.to(compute_dtype)
            grad_h[start : start + chunk_size] = (dlogits @ w).to(h.dtype)
            grad_w += (dlogits.t() @ hc).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None


def run(kind: str, h, w, t, dtype):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    if kind == "qatune":
        loss, _ = response_loss_sum(h, w, t, compute_dtype=dtype)
    elif kind == "previous":
        loss = _Previous.apply(h, w, t, 2048, dtype)
    else:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = reference_loss_sum(h, w, t)  # full logits, fp32 cross-entropy
    (loss / t.numel()).backward()
    return loss.detach(), h.grad, w.grad


def best_cpu(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        c = time.process_time()
        fn()
        times.append(time.process_time() - c)
    return min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    quiet(args.threads)
    torch.manual_seed(0)
    V, d = 50257, 256
    w = torch.randn(V, d) * 0.02
    rows = []
    print(f"\nLM-head loss forward + backward, d={d}, V={V}, {args.threads} thread(s), CPU ms (best of {args.repeat})")
    header = f"{'compute':<9}{'rows':>6}{'qatune':>10}{'previous':>10}{'full logits':>13}"
    print(header + f"{'vs previous':>13}{'max grad diff':>15}")
    for dtype in (torch.float32, torch.bfloat16):
        for n in args.rows:
            h, t = torch.randn(n, d), torch.randint(0, V, (n,))
            ms = {
                k: 1e3 * best_cpu(lambda k=k, h=h, t=t, dtype=dtype: run(k, h, w, t, dtype), args.repeat)
                for k in ("qatune", "previous", "full")
            }
            ours, prev = run("qatune", h, w, t, dtype), run("previous", h, w, t, dtype)
            diff = max(float((a - b).abs().max()) for a, b in zip(ours[1:], prev[1:]))
            name = "fp32" if dtype == torch.float32 else "bf16"
            rows.append({"compute": name, "rows": n, **{f"{k}_ms": v for k, v in ms.items()}, "max_grad_diff": diff})
            print(
                f"{name:<9}{n:>6}{ms['qatune']:>10.1f}{ms['previous']:>10.1f}{ms['full']:>13.1f}"
                f"{ms['previous'] / ms['qatune']:>12.2f}x{diff:>15.1e}"
            )
    emit({"benchmark": "loss_kernel", "args": vars(args), "results": rows, "load_avg": os.getloadavg()})


if __name__ == "__main__":
    main()
