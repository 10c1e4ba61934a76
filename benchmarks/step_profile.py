"""Where a training step's time goes at a real size: the SFT step of GPT-2 small (124M, random
init; `--size smollm2-135m` for a Llama-family model) on packed rows of real t0 Q&A examples, per
phase and against the matmul peak.

Every optimizer step is one micro-batch of `--batch` examples packed into rows of `--max-len`
(the run `sft_vs_trl.py` times, at GPT-2 small's shapes), through the runtime's own `accumulate`
and `optimizer_step`. Each side runs in its own process: it builds the model and batches, takes
`--warmup` steps untimed (allocator warm-up; with a compile side, the compilation of the first
shapes), then `--steps` timed steps. Reported per phase (forward, loss, backward, optimizer, as
the runtime names them): CPU seconds of the training thread (other processes sharing the cores
inflate wall time, not CPU time), and for the step the matmul FLOPs it needs (counted by
`FlopCounterMode` on the same batches in fp32, where CPU's flash attention has no formula: the
linear layers and the LM head, attention left out) per CPU second, against the CPU-time matmul
peak the processes measure in the same precision.

A/B: `--base REV` also runs the qatune source of git revision REV (this benchmark's code, REV's
`src/`), the two sides alternating `--repeats` times, so that both see the same load; medians.

    python -m benchmarks.step_profile --base HEAD~1 --repeats 3
    python -m benchmarks.step_profile --sides eager compile compile-auto
    python -m benchmarks.step_profile --op-profile 25 --repeats 1
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness, sft_vs_trl

PHASES = ("forward", "loss", "backward", "optimizer")
# a side: which compile mode the step model takes (the runtime's `compile` setting)
# (compile: the runtime's `compile: true`; compile-auto: torch.compile's default automatic dynamic shapes)
SIDES = {"eager": False, "compile": True, "compile-auto": "auto"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", help="a size of qatune.model.gpt2.SIZES or qatune.model.llama.SIZES")
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=6, help="timed steps after the warm-up")
    p.add_argument("--repeats", type=int, default=2, help="processes per side, the sides alternating")
    p.add_argument("--sides", nargs="+", choices=list(SIDES), default=["eager"])
    p.add_argument("--base", default=None, metavar="REV", help="also run git revision REV's qatune (eager)")
    p.add_argument("--op-profile", type=int, default=0, metavar="N", help="print torch.profiler's N costliest ops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


# ---------------------------------------------------------------- child


def build(args, work: Path):
    """(the model of `args.size`, random init, seeded; the packed micro-batches, one per step).

    A Llama-family size keeps its shapes and vocabulary: its data are tokenized by GPT-2's BPE
    trimmed to that vocabulary (`sft_vs_trl.trimmed_tokenizer`), as in the SFT benchmark."""

    import torch

    from qatune.model.gpt2 import GPT2, SIZES
    from qatune.model.llama import SIZES as LLAMA_SIZES
    from qatune.model.llama import Llama

    _, batches = sft_vs_trl.micro_batches(args, work)
    torch.manual_seed(args.seed)
    model = Llama(LLAMA_SIZES[args.size]) if args.size in LLAMA_SIZES else GPT2(SIZES[args.size])
    return model, batches[: args.warmup + args.steps]


def step_flops(args, work: Path, model, batches) -> list[float]:
    """Matmul FLOPs of each batch's forward + loss + backward (FlopCounterMode: mm, addmm; CPU
    flash attention uncounted), counted once in fp32 on a copy of the model and kept in the work
    folder: the same for every side."""
    import copy
    import json

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from qatune.methods.sft.method import SFT
    from qatune.train.step import Precision, accumulate

    keys = (args.size, args.n_train, args.batch, args.max_len, args.warmup, args.steps, args.seed)
    cache = work / f"flops-{'-'.join(map(str, keys))}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    probe, out = copy.deepcopy(model), []
    for batch in batches:
        with FlopCounterMode(display=False) as counter:
            accumulate(probe, SFT.stepper(), [batch], Precision("fp32", torch.device("cpu")))
        out.append(float(counter.get_total_flops()))
        probe.zero_grad(set_to_none=True)
    cache.write_text(json.dumps(out))
    return out


def step_model_for(model, mode):
    """The model the step runs: eager, or compiled the way the runtime compiles it."""
    import torch

    if not mode:
        return model
    try:
        from qatune.train.runtime import compile_model
    except ImportError:  # a qatune before `compile_model`: what `compile: true` did then
        compile_model = torch.compile
    return torch.compile(model) if mode == "auto" else compile_model(model)


def run_steps(args, model, step_model, batches, precision) -> list[dict]:
    """Per step: {phase: CPU s}, wall s and CPU s of the whole step."""
    from qatune.methods.sft.method import SFT
    from qatune.train.optim import OptimConfig, build_optimizer
    from qatune.train.step import PhaseClock, accumulate, optimizer_step

    optimizer = build_optimizer(model, OptimConfig(lr=1e-4, warmup_steps=0, weight_decay=0.1))
    rows = []
    for batch in batches:
        wall, cpu = time.perf_counter(), time.thread_time()
        with PhaseClock() as clock:
            t = accumulate(step_model, SFT.stepper(), [batch], precision)
            optimizer_step(model, optimizer, None, precision, 1.0)
        rows.append(
            {"wall_s": time.perf_counter() - wall, "cpu_s": time.thread_time() - cpu, "train_loss": t.loss, **clock.cpu}
        )
    return rows


def child(args) -> None:
    import torch

    from qatune.train.step import Precision

    try:  # as the runtime does on CPU: no page faults on the step's large tensors
        from qatune.utils.malloc import keep_freed_memory

        keep_freed_memory()
    except ImportError:
        pass
    work = Path(args.workdir)
    mode = SIDES.get(args.side.split("@")[0], False)
    model, batches = build(args, work)
    precision = Precision(args.precision, torch.device("cpu"))
    flops = step_flops(args, work, model, batches[args.warmup :])
    peak, peak_cpu = harness.matmul_peak(args.precision)
    load = os.getloadavg()[0]
    step_model = step_model_for(model, mode)
    c0 = time.perf_counter()
    run_steps(args, model, step_model, batches[: args.warmup], precision)
    warm_s = time.perf_counter() - c0
    if args.op_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            rows = run_steps(args, model, step_model, batches[args.warmup :], precision)
        op_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.op_profile)
    else:
        rows = run_steps(args, model, step_model, batches[args.warmup :], precision)
    stats = {
        "side": args.side,
        "warmup_s": warm_s,
        "steps": rows,
        "flops": flops,
        "tokens": [b.n_tokens for b in batches[args.warmup :]],
        "row_lengths": [b.input_ids.shape[1] for b in batches],
        "matmul_peak": peak,
        "matmul_peak_cpu": peak_cpu,
        "load_avg": [load, os.getloadavg()[0]],
    }
    if args.op_profile:
        stats["op_table"] = op_table
    harness.child_result(stats)


# ---------------------------------------------------------------- parent


def base_source(rev: str, work: Path) -> Path:
    """REV's `src/`, unpacked under the work folder (no checkout, no git state touched)."""
    out = work / f"src-{rev.replace('/', '_').replace('~', '-')}"
    if not out.exists():
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev, "src"], cwd=harness.REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out / "src"


def child_argv(args) -> list[str]:
    keys = ("size", "n_train", "batch", "max_len", "precision", "warmup", "steps", "op_profile", "seed", "threads")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def summarize(runs: list[dict]) -> dict:
    """Median over the side's processes of each phase's CPU seconds per step, and the step's rate."""
    per_run = []
    for r in runs:
        steps = r["steps"]
        row = {p: sum(s.get(p, 0.0) for s in steps) / len(steps) for p in PHASES}
        row["step_cpu_s"] = sum(s["cpu_s"] for s in steps) / len(steps)
        row["step_wall_s"] = sum(s["wall_s"] for s in steps) / len(steps)
        row["other"] = row["step_cpu_s"] - sum(row[p] for p in PHASES)
        row["gflop_per_step"] = sum(r["flops"]) / len(steps) / 1e9
        row["gflop_per_cpu_s"] = row["gflop_per_step"] / row["step_cpu_s"]
        row["peak_cpu_gflops"] = r["matmul_peak_cpu"] / 1e9
        per_run.append(row)
    out = {k: statistics.median(row[k] for row in per_run) for k in per_run[0]}
    out["peak_cpu_gflops"] = max(row["peak_cpu_gflops"] for row in per_run)
    out["warmup_s"] = [r["warmup_s"] for r in runs]
    out["losses"] = [s["train_loss"] for s in runs[0]["steps"]]
    out["load_avg"] = [r["load_avg"] for r in runs]
    return out


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if harness.ran_child(args, child):
        return
    work = harness.workdir(args.workdir, "step_profile")
    # a Llama size's data are tokenized by the trimmed vocabulary sft_vs_trl prepares for it
    size = ["--size", args.size] if sft_vs_trl.SIZES.get(args.size, ("gpt2",))[0] == "llama" else []
    data_args = sft_vs_trl.parse_args(["--n-train", str(args.n_train), "--n-heldout", "0", *size])
    data_args.max_len = args.max_len
    sft_vs_trl.prepare(data_args, work)
    sides = [(s, None) for s in args.sides]
    if args.base:
        sides.insert(0, (f"eager@{args.base}", base_source(args.base, work)))
    runs: dict[str, list[dict]] = {s: [] for s, _ in sides}
    for _ in range(args.repeats):
        for side, src in sides:
            env = dict(os.environ)
            if src is not None:  # REV's qatune first on the path, this benchmark's code after it
                env["PYTHONPATH"] = os.pathsep.join([str(src), str(harness.REPO)])
            argv = [*child_argv(args), "--side", side, "--workdir", str(work)]
            runs[side].append(harness.run_child(__file__, argv, side, env=env))
            if "op_table" in runs[side][-1]:
                print(f"\n{side}: costliest operators (torch.profiler)\n" + runs[side][-1].pop("op_table"))
            print(f"  {side}: {runs[side][-1]['steps'][-1]['cpu_s']:.2f} s CPU last step", file=sys.stderr)
    results = {side: summarize(r) for side, r in runs.items()}
    # the machine's matmul rate: the best any process measured (others sharing the cores only lower it)
    peak = max(r["peak_cpu_gflops"] for r in results.values())
    for r in results.values():
        r["peak_cpu_gflops"], r["of_peak"] = peak, r["gflop_per_cpu_s"] / peak
    print(
        f"\n{args.size}, {args.precision}, batch {args.batch} packed into rows of {args.max_len}, "
        f"{args.steps} timed steps after {args.warmup}, {args.threads} thread(s), medians of {args.repeats} "
        f"processes per side; per step, CPU seconds of the training thread"
    )
    head = f"{'side':<22}" + "".join(f"{p:>10}" for p in (*PHASES, "other", "step"))
    print(head + f"{'wall':>8}{'GFLOP':>8}{'GFLOP/s':>9}{'of peak':>9}{'peak':>7}{'load':>6}")
    for side, r in results.items():
        cells = "".join(f"{r[p]:>10.3f}" for p in (*PHASES, "other", "step_cpu_s"))
        load = max(x for pair in r["load_avg"] for x in pair)
        print(
            f"{side:<22}{cells}{r['step_wall_s']:>8.2f}{r['gflop_per_step']:>8.1f}{r['gflop_per_cpu_s']:>9.1f}"
            f"{100 * r['of_peak']:>8.1f}%{r['peak_cpu_gflops']:>7.0f}{load:>6.2f}"
        )
    harness.emit({"benchmark": "step_profile", "args": vars(args) | {"workdir": str(work)}, "results": results})


if __name__ == "__main__":
    main()
