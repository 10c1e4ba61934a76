"""What the training monitor costs: per-layer gradient norms and the prompt-token loss.

The qatune side of `sft_vs_trl.py` (GPT-2 L=4 d=256, 200 t0 examples, batch 8 packed, fp32, 1
thread, 25 steps), trained in fresh processes with `monitor.every` = 0 (off), 50 (the default:
step 1 and every 50th) and 1 (every step, the worst case). The runtime's `monitor` phase
(`qatune.train.step.PhaseClock`) times exactly the monitoring work: the prompt-token loss (a
systematic sample of at most one prompt position per 8 labels, through the LM head without
gradient) and the per-layer norms of the gradients. The sampled prompt rows also ride through
the model's last block (which computes only the rows the step reads), and that extra work lands
in the forward and backward phases, so the cost is also given as the step's
CPU time (forward, loss, backward, optimizer and monitor phases) against the run without
monitoring. The settings run interleaved `--repeats` times in fresh processes; the table gives
medians, the JSON line every run.

Between processes the step time moves by a few percent on a shared machine, as much as the
effect measured. So a second, paired measurement runs in one process: each of the run's
micro-batches (the examples in order, 8 per packed batch) gets a step with monitoring (prompt
loss and per-layer norms) and one without, back to back in alternating order, `--paired` times
over; it gives the ratio of their CPU times. It leaves out the optimizer, checkpoint and data
time, so it overstates the monitor's share of a run slightly.

    python -m benchmarks.monitor_cost
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from benchmarks import sft_vs_trl  # the same data, model and run settings
from benchmarks.harness import child_result, emit, quiet, run_child, workdir

EVERY = (0, 50, 1)


def run_side(args, work: Path, every: int) -> dict:

    from qatune.train.step import PhaseClock

    bench = sft_vs_trl.parse_args(["--n-train", str(args.n_train), "--precision", "fp32"])
    with PhaseClock() as clock:
        stats = sft_vs_trl.run_qatune(
            bench, work, name=f"monitor-{every}-{args.repeat}", overrides={"monitor": {"every": every}}
        )
    return {
        "every": every,
        "steps": stats["steps"],
        "train_s": stats["train_s"],
        "train_cpu_s": stats["train_cpu_s"],
        "monitor_cpu_s": clock.cpu.get("monitor", 0.0),
        "step_cpu_s": sum(clock.cpu.get(p, 0.0) for p in ("forward", "loss", "backward", "optimizer", "monitor")),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each setting")
    p.add_argument("--paired", type=int, default=6, help="passes of the in-process paired measurement")
    p.add_argument("--workdir", default=None)
    p.add_argument("--every", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)  # child: its run folder
    args = p.parse_args(argv)
    quiet(args.threads)
    if args.every is not None:
        return child_result(run_side(args, Path(args.workdir), args.every))
    work = workdir(args.workdir, "monitor_cost")
    sft_vs_trl.prepare(sft_vs_trl.parse_args(["--n-train", str(args.n_train), "--precision", "fp32"]), work)
    runs = []
    for i in range(args.repeats):  # interleaved, so that a change in the machine's load hits every setting
        for every in EVERY:
            runs.append(_run_child(args, work, every, i))
    off = _median(runs, 0)
    print(f"\n{args.n_train} t0 examples, GPT-2 L=4 d=256, batch 8 packed, fp32, {args.threads} thread(s)")
    print(f"CPU seconds, median of {args.repeats} interleaved runs per setting")
    print(
        f"{'monitor.every':<15}{'run CPU s':>10}{'step CPU s':>12}{'monitor CPU s':>15}{'monitor share':>15}"
        f"{'step vs off':>13}{'run vs off':>12}"
    )
    rows = []
    for every in EVERY:
        r = _median(runs, every)
        r["monitor_share"] = r["monitor_cpu_s"] / r["train_cpu_s"]
        r["step_vs_off"] = r["step_cpu_s"] / off["step_cpu_s"]
        r["run_vs_off"] = r["train_cpu_s"] / off["train_cpu_s"]
        rows.append(r)
        print(
            f"{every:<15}{r['train_cpu_s']:>10.2f}{r['step_cpu_s']:>12.2f}{r['monitor_cpu_s']:>15.3f}"
            f"{100 * r['monitor_share']:>14.1f}%{r['step_vs_off']:>12.3f}x{r['run_vs_off']:>11.3f}x"
        )
    paired = paired_steps(args, work)
    print(f"\npaired in one process ({args.paired} passes over the {paired['batches']} micro-batches):")
    print(f"{'pass':<6}{'off CPU s':>11}{'every step CPU s':>18}{'ratio':>8}")
    for i, (a, b) in enumerate(zip(paired["off_cpu_s"], paired["on_cpu_s"])):
        print(f"{i:<6}{a:>11.2f}{b:>18.2f}{b / a:>7.3f}x")
    print(f"median ratio {paired['median_ratio']:.3f}x (forward, loss, backward + monitoring vs without)")
    line = {
        "benchmark": "monitor_cost",
        "args": vars(args),
        "results": rows,
        "runs": runs,
        "paired": paired,
        "load_avg": os.getloadavg(),
    }
    emit(line)


def paired_steps(args, work: Path) -> dict:
    """CPU seconds of the run's micro-batches with and without monitoring, paired per batch."""
    import torch

    from qatune.methods.sft.step import train_step
    from qatune.train.grad_norms import layer_grad_norms
    from qatune.train.step import Precision

    bench = sft_vs_trl.parse_args(["--n-train", str(args.n_train), "--precision", "fp32"])
    model, batches = sft_vs_trl.micro_batches(bench, work)
    precision = Precision("fp32", torch.device("cpu"))

    def step(batch, monitor: bool) -> float:
        model.zero_grad(set_to_none=True)
        t = time.thread_time()
        train_step(model, [batch], precision, measure_prompt_loss=monitor)
        if monitor:
            layer_grad_norms(model, precision, sharded=False)
        return time.thread_time() - t

    off, on = [], []
    for i in range(args.paired):
        sums = {False: 0.0, True: 0.0}
        for batch in batches:
            for monitor in (False, True) if i % 2 == 0 else (True, False):
                sums[monitor] += step(batch, monitor)
        off.append(sums[False])
        on.append(sums[True])
    ratio = statistics.median(b / a for a, b in zip(off, on))
    return {"batches": len(batches), "off_cpu_s": off, "on_cpu_s": on, "median_ratio": ratio}


def _run_child(args, work: Path, every: int, repeat: int) -> dict:
    argv = ["--n-train", str(args.n_train), "--threads", str(args.threads), "--workdir", str(work)]
    return run_child(__file__, [*argv, "--every", str(every), "--repeat", str(repeat)], f"monitor.every={every}")


def _median(runs: list[dict], every: int) -> dict:
    mine = [r for r in runs if r["every"] == every]
    keys = ("train_s", "train_cpu_s", "monitor_cpu_s", "step_cpu_s")
    return {"every": every, "steps": mine[0]["steps"], **{k: statistics.median(r[k] for r in mine) for k in keys}}


if __name__ == "__main__":
    main()
