"""The tied token embedding's gradient in a whole training step, three ways, for SFT and DPO.

GPT-2's LM head is its token embedding (50,257 x d). A step's gradient for it has two parts: the
head's dense dL/dW (every vocabulary row) and the embedding lookup's (only the rows of the input
tokens). Three ways to form their sum:

- dense: the lookup's gradient as a zero-filled vocab x d tensor, summed with the head's by
  autograd;
- sparse, through autograd: the lookup's gradient sparse (`sparse_embedding_grad`), the head's
  returned through autograd. Autograd never adds in place into a custom Function's returned
  gradient, so the sum is a fresh vocab x d tensor and a full copy;
- sparse, head into `.grad` (what qatune runs): the head's dL/dW written straight into
  `weight.grad` (`weight_grad_into_grad`), the lookup's sparse rows then added in place.

Each is a whole step (forward with the last block cut to the scored rows, the chunked head and
its loss, backward) on real data: SFT on the `sft_vs_trl.py` t0 examples (8 per packed
micro-batch), DPO on the `dpo_vs_trl.py` HH-RLHF pairs (8 pairs per micro-batch, reference
log-probs computed once), GPT-2 L=4 d=256 random init, fp32. The three variants of each
micro-batch run back to back in rotating order, `--passes` times over all micro-batches; the
table gives each variant's median ms per step and the ratio to qatune's. All three give the same
gradients (checked on the first micro-batch). Prints a table and one JSON line.

    python -m benchmarks.embedding_grad
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks import (
    dpo_vs_trl,  # the same pairs and model
    sft_vs_trl,  # the same examples and model
)
from benchmarks.harness import emit, quiet, workdir

VARIANTS = {  # name: (sparse embedding gradient, head's dL/dW into .grad)
    "dense": (False, False),
    "sparse, through autograd": (True, False),
    "sparse, head into .grad": (True, True),
}


def sft_steps(work: Path, n_train: int):
    """(model, a step function per micro-batch) for SFT on the t0 examples."""
    from qatune.data.batching import model_inputs
    from qatune.kernels.loss import rows_loss_sum

    bench = sft_vs_trl.parse_args(["--n-train", str(n_train), "--precision", "fp32"])
    sft_vs_trl.prepare(bench, work)
    model, batches = sft_vs_trl.micro_batches(bench, work)

    def step(batch, sparse: bool, into_grad: bool) -> None:
        hidden = model(**model_inputs(batch), outputs=batch.label_index, sparse_embedding_grad=sparse)
        targets = batch.targets.flatten().index_select(0, batch.label_index)
        loss = rows_loss_sum(hidden, model.wte.weight, targets, weight_grad_into_grad=into_grad)
        (loss / batch.count).backward()

    return model, batches, step


def dpo_steps(work: Path, n_train: int):
    """(model, a step function per micro-batch) for DPO on the HH-RLHF pairs."""
    from qatune.data.batching import model_inputs
    from qatune.data.preference.batching import collate_pairs
    from qatune.methods.dpo.loss import DPOConfig
    from qatune.methods.dpo.step import dpo_loss_sum, sequence_logps
    from qatune.model.hf_io import from_pretrained

    args = dpo_vs_trl.parse_args(["--n-train", str(n_train)])
    dpo_vs_trl.prepare(args, work)
    pairs = dpo_vs_trl.load_pairs(work / "train.jsonl", args.max_len)
    model, reference = from_pretrained(work / "init"), from_pretrained(work / "init").eval()
    eos = sft_vs_trl.tokenizer().eos_token_id
    batches = []
    for i in range(0, len(pairs), args.batch):
        part = pairs[i : i + args.batch]
        batch = collate_pairs(part, list(range(len(part))), pad_id=eos, capacity=args.max_len)
        with torch.no_grad():
            ref = sequence_logps(reference(**model_inputs(batch)), reference.wte.weight, batch)
        batches.append((batch, ref))
    cfg = DPOConfig(beta=args.beta)

    def step(item, sparse: bool, into_grad: bool) -> None:
        batch, ref = item
        hidden = model(**model_inputs(batch), outputs=batch.label_index, sparse_embedding_grad=sparse)
        loss, _ = dpo_loss_sum(hidden, model.wte.weight, batch, ref, cfg, weight_grad_into_grad=into_grad)
        (loss / batch.n_pairs).backward()

    return model, batches, step


def gradients(model, step, item, variant: str) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    step(item, *VARIANTS[variant])
    return {n: p.grad.to_dense().clone() for n, p in model.named_parameters()}


def measure(model, batches, step, passes: int) -> dict[str, float]:
    """Median ms per micro-batch step of each variant, the variants rotating their order."""
    names = list(VARIANTS)
    want = gradients(model, step, batches[0], names[-1])
    for name in names[:-1]:  # the same step, whichever way the sum is formed
        for n, g in gradients(model, step, batches[0], name).items():
            torch.testing.assert_close(g, want[n], rtol=1e-5, atol=1e-7, msg=f"{name}: {n}")
    times: dict[str, list[float]] = {n: [] for n in names}
    for p in range(passes):
        for i, item in enumerate(batches):
            k = (p + i) % len(names)
            for name in names[k:] + names[:k]:
                model.zero_grad(set_to_none=True)  # as the optimizer leaves it between steps
                t = time.thread_time()
                step(item, *VARIANTS[name])
                times[name].append(time.thread_time() - t)
    return {n: 1000 * statistics.median(v) for n, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train-sft", type=int, default=200)
    p.add_argument("--n-train-dpo", type=int, default=96)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    quiet(args.threads)
    work = workdir(args.workdir, "embedding_grad")
    results = {}
    for method, build, n in (("sft", sft_steps, args.n_train_sft), ("dpo", dpo_steps, args.n_train_dpo)):
        (work / method).mkdir(parents=True, exist_ok=True)
        model, batches, step = build(work / method, n)
        results[method] = {"micro_batches": len(batches), "ms": measure(model, batches, step, args.passes)}
    ours = list(VARIANTS)[-1]
    print(f"\nCPU ms per micro-batch step (median over {args.passes} passes), fp32, {args.threads} thread(s)")
    print(f"{'method':<8}{'variant':<28}{'ms/step':>9}{'vs qatune':>11}")
    for method, r in results.items():
        r["vs_qatune"] = {n: ms / r["ms"][ours] for n, ms in r["ms"].items()}
        for name, ms in r["ms"].items():
            print(f"{method:<8}{name:<28}{ms:>9.1f}{r['vs_qatune'][name]:>10.3f}x")
    emit({"benchmark": "embedding_grad", "args": vars(args), "results": results, "load_avg": os.getloadavg()})


if __name__ == "__main__":
    main()
