"""Predicted vs measured: `qatune plan --measure` for GPT-2 sizes on this machine.

Each configuration runs ONE real training step (forward, chunked response-only loss, backward,
fused AdamW step) in a fresh Python process and is compared with the plan, component by
component. A configuration whose predicted peak does not fit in the memory available now (with
a 15% margin; other people share this machine) is skipped, not attempted.

    python -m benchmarks.plan_measure                       # gpt2 and gpt2-large, seq 512, fp32
    python -m benchmarks.plan_measure --models gpt2 --precision bf16

Prints one table per configuration and, last, one JSON line with every row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.harness import emit
from qatune.analysis.measure import MEASURABLE_PRECISIONS, calibrate, compare, measure_in_subprocess
from qatune.analysis.memory import plan_memory
from qatune.analysis.setup import PlanSetup
from qatune.model.gpt2 import SIZES
from qatune.utils.device import DTYPES


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def fmt(value, unit: str) -> str:
    if value is None:
        return "n/a"
    return {"bytes": f"{value / 1e9:.3f} GB", "FLOP": f"{value / 1e12:.3f} TFLOP"}.get(unit, f"{value:.1f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["gpt2", "gpt2-large"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=list(MEASURABLE_PRECISIONS))
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--label-fraction", type=float, default=0.5)
    args = p.parse_args()

    results = []
    for name in args.models:
        s = PlanSetup(
            SIZES[name],
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            precision=args.precision,
            checkpointing=args.checkpointing,
            label_fraction=args.label_fraction,
            device="cpu",
            name=name,
        )
        need, have = plan_memory(s).first_step_peak, available_bytes()
        if need * 1.15 > have:
            print(f"{name}: skipped, predicted peak {need / 1e9:.1f} GB (+15%) > {have / 1e9:.1f} GB available now")
            results.append({"model": name, "skipped": True, "predicted_peak": need, "available": have})
            continue
        m = measure_in_subprocess(s)
        rates = calibrate(torch.device("cpu"), DTYPES[s.precision], s.config.n_embd, s.tokens, 1 << 26)
        rows = compare(s, m, rates)
        print(
            f"\n{name}: seq {s.seq_len} x micro-batch {s.micro_batch}, {s.precision}, checkpointing "
            f"{'on' if s.checkpointing else 'off'}, {s.label_tokens} label positions; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; peak from {m.peak_source}"
        )
        print(f"| {'component':<58} | {'predicted':>14} | {'measured':>14} | {'ratio':>6} |")
        print(f"|{'-' * 60}|{'-' * 16}|{'-' * 16}|{'-' * 8}|")
        for r in rows:
            ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "n/a"
            print(
                f"| {r['name']:<58} | {fmt(r['predicted'], r['unit']):>14} | {fmt(r['measured'], r['unit']):>14} "
                f"| {ratio:>6} |"
            )
        print(
            f"calibration: matmul {rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, AdamW "
            f"{rates['adamw_params_per_s'] / 1e6:.0f}M params/s; optimizer step alone {m.optimizer_seconds:.1f} s"
        )
        memory_rows = [r for r in rows if r["unit"] != "s"]
        results.append(
            {
                "model": name,
                "seq_len": s.seq_len,
                "micro_batch": s.micro_batch,
                "precision": s.precision,
                "rows": rows,
                "calibration": rates,
                "optimizer_seconds": m.optimizer_seconds,
                "all_within_10pct": all(r["ratio"] is not None and abs(r["ratio"] - 1) <= 0.10 for r in memory_rows),
            }
        )
    emit({"benchmark": "plan_measure", "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
