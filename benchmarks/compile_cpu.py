"""`compile: true` on this CPU: the benchmark's training run with and without torch.compile.

The qatune side of `sft_vs_trl.py` (GPT-2 L=4 d=256, t0 examples, batch 8 packed, fp32, 1
thread), trained twice in fresh processes: eager, then with `compile: true` (the runtime compiles
the model; packed rows then take the dense-mask attention, since per-document lengths would
recompile the graph for every batch). Reported: the first steps (where compilation happens), the
median step after them, the whole run, peak RSS, and how far the per-step losses moved.

Then the LM-head loss's chunk body alone (128 and 512 label rows x GPT-2's vocabulary): the eager
in-place body of `qatune.kernels.loss` against torch.compile of the same math written plainly.

    python -m benchmarks.compile_cpu --n-train 200
Prints tables and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from benchmarks import sft_vs_trl  # the same data, model and run settings
from benchmarks.harness import child_result, emit, quiet, run_child, run_settings, tokenizer, workdir


def run_side(args, work: Path, compile_model: bool) -> dict:
    """One training run in this process; per-step wall seconds from the logged `elapsed`."""

    from qatune.train.step import PhaseClock

    sft_vs_trl_args = sft_vs_trl.parse_args(["--n-train", str(args.n_train), "--precision", "fp32"])
    t0 = time.process_time()
    with PhaseClock():
        stats = run_qatune(sft_vs_trl_args, work, compile_model)
    history = stats.pop("history")
    elapsed = [r["elapsed"] for r in history]
    steps = [b - a for a, b in zip([0.0, *elapsed], elapsed)]
    return {
        "compile": compile_model,
        "train_s": stats["train_s"],
        "train_cpu_s": time.process_time() - t0,
        "first_steps_s": steps[:3],
        "median_step_s": statistics.median(steps[3:]),
        "losses": [r["loss"] for r in history],
    }


def run_qatune(args, work: Path, compile_model: bool) -> dict:
    from qatune.config import from_dict
    from qatune.data.pipeline import DataConfig, load_examples
    from qatune.launch import fit
    from qatune.methods.config import TrainConfig
    from qatune.model.hf_io import from_pretrained

    tok = tokenizer()
    data = DataConfig(sources=[str(work / "train.jsonl")], template="raw", max_len=args.max_len)
    examples = load_examples(data, tok).examples
    model = from_pretrained(work / "init")
    cfg = from_dict(
        TrainConfig,
        {
            "name": f"compile-{compile_model}",
            "data": {"sources": data.sources, "template": "raw", "max_len": args.max_len},
            "out_dir": str(work / "runs"),
            "batch": {"strategy": "packed", "size": args.batch, "unit": "examples"},
            "optim": {"lr": args.lr, "lr_min": args.lr_min, "warmup_steps": args.warmup, "weight_decay": 0.0},
            **run_settings(export=False),
            "precision": "fp32",
            "seed": args.seed,
            "compile": compile_model,
        },
    )
    t0 = time.perf_counter()
    result = fit(model, tok, examples, cfg, progress=False)
    return {"train_s": time.perf_counter() - t0, "history": result.history}


def chunk_body_table() -> list[dict]:
    """Eager in-place chunk body vs torch.compile of the plain formulation (CPU seconds)."""
    import torch

    from qatune.kernels.loss import head_log_softmax, softmax_minus_onehot_

    def plain(hc, w, t):
        logits = hc @ w.t()
        lse = torch.logsumexp(logits, -1)
        loss = (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        d = torch.softmax(logits, -1) - torch.nn.functional.one_hot(t, logits.shape[1]).to(logits.dtype)
        return loss, d

    def best(fn, n=5):
        fn()
        times = []
        for _ in range(n):
            c = time.process_time()
            fn()
            times.append(time.process_time() - c)
        return min(times)

    compiled = torch.compile(plain, dynamic=True)
    w = torch.randn(50257, 256) * 0.02
    rows = []
    for n in (128, 512):
        hc, t = torch.randn(n, 256), torch.randint(0, 50257, (n,))
        buf = torch.empty(n, 50257)

        def eager(hc=hc, t=t, buf=buf):
            logp = head_log_softmax(hc, w, buf)
            loss = -logp.gather(1, t[:, None]).sum()
            return loss, softmax_minus_onehot_(logp, t)

        c = time.perf_counter()  # wall: inductor compiles C++ in worker processes
        ref_loss, ref_d = compiled(hc, w, t)
        compile_s = time.perf_counter() - c
        loss, d = eager()
        rows.append(
            {
                "rows": n,
                "eager_ms": 1e3 * best(eager),
                "compiled_ms": 1e3 * best(lambda hc=hc, t=t: compiled(hc, w, t)),
                "compile_s": compile_s,
                "max_diff": float((d - ref_d).abs().max()),
                "loss_rel_diff": float(((loss - ref_loss) / ref_loss).abs()),
            }
        )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--side", choices=["eager", "compiled", "body"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quiet(args.threads)
    if args.side:
        if args.side == "body":
            out = {"rows": chunk_body_table()}
        else:
            out = run_side(args, Path(args.workdir), args.side == "compiled")
        return child_result(out)
    work = workdir(args.workdir, "compile_cpu")
    bench_args = sft_vs_trl.parse_args(["--n-train", str(args.n_train), "--precision", "fp32"])
    sft_vs_trl.prepare(bench_args, work)
    results = {}
    for side in ("eager", "compiled", "body"):
        argv = ["--n-train", str(args.n_train), "--threads", str(args.threads), "--workdir", str(work), "--side", side]
        results[side] = run_child(__file__, argv, side)
    results["body"] = results["body"]["rows"]
    eager, compiled = results["eager"], results["compiled"]
    loss_diff = max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"]))
    print(f"\n{args.n_train} t0 examples, GPT-2 L=4 d=256, batch 8 packed, fp32, {args.threads} thread(s)")
    print(f"{'model':<10}{'run s':>8}{'CPU s':>8}{'steps 1-3 s':>22}{'median step s':>15}{'peak RSS MB':>13}")
    for r in (eager, compiled):
        first = " ".join(f"{x:.2f}" for x in r["first_steps_s"])
        name = "compiled" if r["compile"] else "eager"
        print(
            f"{name:<10}{r['train_s']:>8.1f}{r['train_cpu_s']:>8.1f}{first:>22}{r['median_step_s']:>15.3f}"
            f"{r['peak_rss_mb']:>13.0f}"
        )
    print(f"largest per-step loss difference, compiled vs eager: {loss_diff:.2e}")
    print(f"\n{'loss chunk body':<18}{'eager ms':>10}{'compiled ms':>13}{'compile s':>11}{'max |diff|':>12}")
    for r in results["body"]:
        print(
            f"{r['rows']:>4} rows{'':<9}{r['eager_ms']:>10.1f}{r['compiled_ms']:>13.1f}{r['compile_s']:>11.1f}"
            f"{r['max_diff']:>12.1e}"
        )
    for r in (eager, compiled):
        r.pop("losses")
    record = {"benchmark": "compile_cpu", "args": vars(args), "max_loss_diff": loss_diff, **results}
    emit(record | {"load_avg": os.getloadavg()})


if __name__ == "__main__":
    main()
