"""What the training monitor costs: per-layer gradient norms and the prompt-token loss.

The qatune side of `sft_vs_trl.py` (GPT-2 L=4 d=256, 200 t0 examples, batch 8 packed, fp32, 1
thread, 25 steps), trained in fresh processes with `monitor.every` = 0 (off), 50 (the default:
step 1 and every 50th) and 1 (every step, the worst case). The runtime's `monitor` phase
(`qatune.train.step.PhaseClock`) times exactly the monitoring work: the prompt-token loss (a
systematic sample of at most the batch's label count of prompt positions, through the LM head
without gradient) and the per-layer norms of the gradients. Reported: its CPU seconds against
the run's, and the whole run against the run without monitoring.

    python benchmarks/monitor_cost.py
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft_vs_trl  # noqa: E402  (the same data, model and run settings)

EVERY = (0, 50, 1)


def run_side(args, work: Path, every: int) -> dict:
    import torch

    from qatune.train.step import PhaseClock

    torch.set_num_threads(args.threads)
    bench = sft_vs_trl.parse_args(["--n-train", str(args.n_train), "--precision", "fp32"])
    with PhaseClock() as clock:
        stats = sft_vs_trl.run_qatune(bench, work, name=f"monitor-{every}", overrides={"monitor": {"every": every}})
    return {
        "every": every,
        "steps": stats["steps"],
        "train_s": stats["train_s"],
        "train_cpu_s": stats["train_cpu_s"],
        "monitor_cpu_s": clock.cpu.get("monitor", 0.0),
        "step_cpu_s": sum(clock.cpu.get(p, 0.0) for p in ("forward", "loss", "backward", "optimizer")),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--every", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    if args.every is not None:
        print("RESULT " + json.dumps(run_side(args, Path(args.workdir), args.every)), flush=True)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="monitor_cost."))
    work.mkdir(parents=True, exist_ok=True)
    sft_vs_trl.prepare(sft_vs_trl.parse_args(["--n-train", str(args.n_train), "--precision", "fp32"]), work)
    rows = []
    for every in EVERY:
        cmd = [sys.executable, __file__, "--n-train", str(args.n_train), "--threads", str(args.threads)]
        proc = subprocess.run([*cmd, "--workdir", str(work), "--every", str(every)], capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"monitor.every={every} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
    off = rows[0]
    print(f"\n{args.n_train} t0 examples, GPT-2 L=4 d=256, batch 8 packed, fp32, {args.threads} thread(s), CPU seconds")
    print(f"{'monitor.every':<15}{'run CPU s':>10}{'monitor CPU s':>15}{'monitor share':>15}{'run vs off':>12}")
    for r in rows:
        r["monitor_share"] = r["monitor_cpu_s"] / r["train_cpu_s"]
        r["run_vs_off"] = r["train_cpu_s"] / off["train_cpu_s"]
        print(
            f"{r['every']:<15}{r['train_cpu_s']:>10.2f}{r['monitor_cpu_s']:>15.3f}{100 * r['monitor_share']:>14.1f}%"
            f"{r['run_vs_off']:>11.3f}x"
        )
    print(json.dumps({"benchmark": "monitor_cost", "args": vars(args), "results": rows, "load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
