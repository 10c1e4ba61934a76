"""Packed-row attention on this CPU: the dense boolean mask against per-document attention.

The benchmark's setting of `sft_vs_trl.py`: GPT-2 with 4 layers, d=256, 4 heads; real t0 Q&A
examples (../shared/data/t0_qa_subset, raw template, <= 512 tokens), 8 examples per micro-batch
packed into rows of 512 tokens (best fit). For each micro-batch, each kernel runs the model's
forward, the response-only loss and the backward; the time is the best of `--repeat` runs (CPU
time of this process, so other processes on the machine count less), summed over the batches.

- dense: SDPA with a (B, 1, T, T) "same document and not in the future" mask over the padded rows
  (the reference; SDPA computes every block of the row, masked or not).
- documents: the rows' padding dropped, every document through plain causal SDPA on its own.
- flex (forward only): FlexAttention with the document block mask. torch 2.13 has no FlexAttention
  backward on CPU, and eager FlexAttention is an unfused reference, so it is timed for the
  forward alone, next to the dense forward; it is the GPU kernel, where it is compiled.

Agreement: the largest difference from the dense kernel in the hidden states at real tokens and
in any gradient (relative to that gradient's largest entry).

    python -m benchmarks.attention                 # 12 micro-batches, 1 thread
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

from benchmarks.harness import SHARED, emit, quiet


def batches(n_batches: int, batch: int, max_len: int, seed: int):
    from qatune.data.pipeline import DataConfig, load_examples
    from qatune.data.plan import make_batch
    from qatune.model.tokenizer import load_tokenizer

    tok = load_tokenizer(SHARED / "tokenizer" / "gpt2")
    data = DataConfig(sources=[str(SHARED / "data" / "t0_qa_subset" / "*.jsonl")], template="raw", max_len=max_len)
    examples = [e for e in load_examples(data, tok).examples if len(e) <= max_len]
    random.Random(seed).shuffle(examples)
    groups = [examples[i * batch : (i + 1) * batch] for i in range(n_batches)]
    return [make_batch(g, "packed", max_len, tok.pad_token_id) for g in groups]


def step(model, b, kernel: str, grad: bool = True):
    from qatune.kernels.loss import response_loss_sum

    model.attention_kernel = kernel
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        hidden = model(b.input_ids, position_ids=b.position_ids, doc_ids=b.doc_ids)
        loss, n = response_loss_sum(hidden, model.wte.weight, b.targets)
        if grad:
            (loss / n).backward()
    return hidden.detach()


def best_cpu_time(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quiet(args.threads)

    from qatune.model.gpt2 import GPT2, GPT2Config

    torch.manual_seed(args.seed)
    model = GPT2(GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=args.max_len)).train()
    data = batches(args.batches, args.batch, args.max_len, args.seed)
    slots = sum(b.input_ids.numel() for b in data)
    tokens = sum(b.n_tokens for b in data)

    times = {"dense": 0.0, "documents": 0.0, "dense_forward": 0.0, "flex_forward": 0.0}
    worst = {"documents_hidden": 0.0, "documents_grad": 0.0, "flex_hidden": 0.0}
    for b in data:
        for kernel in ("dense", "documents"):
            times[kernel] += best_cpu_time(lambda k=kernel, b=b: step(model, b, k), args.repeat)
        for kernel in ("dense", "flex"):
            times[f"{kernel}_forward"] += best_cpu_time(
                lambda k=kernel, b=b: step(model, b, k, grad=False), args.repeat
            )
        real = b.doc_ids >= 0
        ref = step(model, b, "dense")
        ref_grads = {n: q.grad.clone() for n, q in model.named_parameters()}
        got = step(model, b, "documents")
        worst["documents_hidden"] = max(worst["documents_hidden"], (got - ref)[real].abs().max().item())
        for n, q in model.named_parameters():
            rel = ((q.grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-30)).item()
            worst["documents_grad"] = max(worst["documents_grad"], rel)
        flex = step(model, b, "flex", grad=False)
        worst["flex_hidden"] = max(worst["flex_hidden"], (flex - ref)[real].abs().max().item())

    print(
        f"\n{args.batches} micro-batches of {args.batch} t0 examples packed into {args.max_len}-token rows "
        f"({tokens} tokens in {slots} row slots, {100 * (1 - tokens / slots):.0f}% padding); GPT-2 L=4 d=256; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); CPU seconds, best of {args.repeat}"
    )
    print(f"{'kernel':<28}{'s':>8}{'vs dense':>10}{'max |diff| (hidden)':>22}{'max rel diff (grads)':>22}")
    rows = [
        ("dense mask: fwd+loss+bwd", times["dense"], 1.0, 0.0, 0.0),
        (
            "documents: fwd+loss+bwd",
            times["documents"],
            times["dense"] / times["documents"],
            worst["documents_hidden"],
            worst["documents_grad"],
        ),
        ("dense mask: forward", times["dense_forward"], 1.0, 0.0, None),
        (
            "flex (eager): forward",
            times["flex_forward"],
            times["dense_forward"] / times["flex_forward"],
            worst["flex_hidden"],
            None,
        ),
    ]
    for name, t, speedup, dh, dg in rows:
        grads = f"{dg:>22.1e}" if dg is not None else f"{'n/a':>22}"
        print(f"{name:<28}{t:>8.3f}{speedup:>9.2f}x{dh:>22.1e}{grads}")
    record = {
        "benchmark": "attention",
        "args": vars(args),
        "tokens": tokens,
        "row_slots": slots,
        "cpu_s": times,
        "max_diff": worst,
        "documents_speedup": times["dense"] / times["documents"],
        "load_avg": os.getloadavg(),  # 1, 5, 15-minute load: other processes on the cores
    }
    emit(record)


if __name__ == "__main__":
    sys.exit(main())
