"""LoRA vs full fine-tuning: peak memory, step time and checkpoint size, measured side by side with
the planner's predictions, same model and same data.

Every measurement runs in a fresh Python process that first does one warm-up step on a 1-layer
model (kernels' first use is not the model's memory or time), then `--steps` training steps of the
runtime's own step code: `accumulate` with the SFT step (forward, chunked response-only loss,
backward), then `optimizer_step` (clip, fused AdamW). Random-init weights of the named size; the
batch is `qatune.analysis.measure`'s synthetic one (random ids, the last half of each row
labelled), identical on both sides.

- Memory: one process per side with glibc's mmap threshold fixed, as `qatune plan --measure` runs
  (freed tensors leave RSS, so the peak RSS tracks live tensors).
- Time: `--rounds` processes per side with the allocator setting CPU training uses
  (`qatune.utils.malloc.keep_freed_memory`: no mmap, no trim; the fixed threshold above would cost
  every large allocation a fresh mmap and its page faults: measured +11% CPU time per full step,
  +23% per LoRA step, against glibc's default), alternating full, LoRA, full, LoRA so that a
  change in the load of a shared machine hits both. Wall time and the process's CPU time per
  step (1 thread: CPU time is the compute itself, wall time adds the waiting for a core); medians
  over the steps after the first.
  The planner's estimate is for a FIRST step (its AdamW rate is calibrated on a first step, which
  creates the moments), so it is compared with the measured first step.

    python -m benchmarks.lora_vs_full                    # gpt2, seq 256 x 4, fp32, 1 thread, r=16
    python -m benchmarks.lora_vs_full --model gpt2-medium --rounds 3

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time

import torch

from benchmarks.harness import child_result, emit, quiet, run_child
from qatune.analysis.compute import plan_compute
from qatune.analysis.measure import (
    MEASURE_ENV,
    calibrate,
    estimate_step_seconds,
    setup_from_json,
    setup_to_json,
    warm_up_setup,
)
from qatune.analysis.memory import plan_memory
from qatune.analysis.setup import PlanSetup
from qatune.model.gpt2 import SIZES


def run_side(s: PlanSetup, steps: int, alpha: float, memory: bool) -> dict:
    """In the child process: `steps` real training steps of setup `s`, measured."""
    from qatune.analysis.measure import _as_batch, _reset_peak_rss, _rss_kb, measure_step, synthetic_batch
    from qatune.methods.sft import SFT
    from qatune.model.gpt2 import GPT2
    from qatune.model.lora import LoRAConfig, apply_lora
    from qatune.train.checkpoints import trainable_state_dict
    from qatune.train.optim import OptimConfig, build_optimizer
    from qatune.train.step import Precision, accumulate, optimizer_step
    from qatune.utils.malloc import keep_freed_memory

    if not memory:
        keep_freed_memory()  # as the runtime does on CPU
    measure_step(warm_up_setup(s), count_flops=False)
    device = torch.device("cpu")
    batch = _as_batch(synthetic_batch(s), s)
    _reset_peak_rss()
    base = _rss_kb("VmRSS") * 1024
    torch.manual_seed(0)
    model = GPT2(s.config)
    if s.lora_r:
        apply_lora(model, LoRAConfig(r=s.lora_r, alpha=alpha, targets=list(s.lora_targets)))
    model.train()
    optimizer, precision = build_optimizer(model, OptimConfig()), Precision(s.precision, device)
    wall, cpu, peaks = [], [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        accumulate(model, SFT.stepper(), [batch], precision)
        optimizer_step(model, optimizer, None, precision, OptimConfig().grad_clip)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        peaks.append(_rss_kb("VmHWM") * 1024 - base)
    checkpoint = io.BytesIO()  # what a checkpoint of this run holds (state.pt's model + optimizer)
    torch.save({"model": trainable_state_dict(model), "optimizer": optimizer.state_dict()}, checkpoint)
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "first_step_peak": peaks[0],
        "peak": peaks[-1],
        "checkpoint_bytes": checkpoint.getbuffer().nbytes,
    }


def child(s: PlanSetup, steps: int, alpha: float, threads: int, memory: bool) -> dict:
    payload = json.dumps({"setup": setup_to_json(s), "steps": steps, "alpha": alpha, "memory": memory})
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if memory:
        env.update(MEASURE_ENV)
    return run_child(__file__, ["--child", payload, "--threads", str(threads)], "a measuring process", env)


def predict(s: PlanSetup, rates: dict) -> dict:
    plan, compute = plan_memory(s), plan_compute(s)
    return {
        "trainable": plan.state.trainable,
        "first_step_peak": plan.first_step_peak,
        "peak": plan.peak,
        "first_step_seconds": estimate_step_seconds(compute.hardware_flops, plan.state.trainable, rates),
        "flops": compute.hardware_flops,
    }


def measure_sides(sides: dict[str, PlanSetup], args) -> dict[str, dict]:
    memory = {name: child(s, 2, args.alpha, args.threads, memory=True) for name, s in sides.items()}
    timing: dict[str, list[dict]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name, s in sides.items():
            timing[name].append(child(s, args.steps, args.alpha, args.threads, memory=False))
            shown = ", ".join(
                f"{w:.1f}/{c:.1f}" for w, c in zip(timing[name][-1]["wall_seconds"], timing[name][-1]["cpu_seconds"])
            )
            print(f"round {round_ + 1}, {name}: wall/CPU s per step {shown}", file=sys.stderr)
    out = {}
    for name in sides:
        runs, mem = timing[name], memory[name]
        out[name] = {
            "trainable": mem["trainable"],
            "checkpoint_bytes": mem["checkpoint_bytes"],
            "first_step_peak": mem["first_step_peak"],
            "peak": mem["peak"],
            "first_step_seconds": statistics.median(r["wall_seconds"][0] for r in runs),
            "later_step_seconds": statistics.median(t for r in runs for t in r["wall_seconds"][1:]),
            "later_step_cpu_seconds": statistics.median(t for r in runs for t in r["cpu_seconds"][1:]),
            "timing_runs": [{k: r[k] for k in ("wall_seconds", "cpu_seconds")} for r in runs],
        }
    return out


ROWS = [  # label, predicted key, measured key, format, scale
    ("trainable parameters", "trainable", "trainable", "{:,.0f}", 1),
    ("peak RSS, first step (GB)", "first_step_peak", "first_step_peak", "{:.3f}", 1e9),
    ("peak RSS, later steps (GB)", "peak", "peak", "{:.3f}", 1e9),
    ("step time, first step, wall (s)", "first_step_seconds", "first_step_seconds", "{:.2f}", 1),
    ("step time, later steps, wall (s)", None, "later_step_seconds", "{:.2f}", 1),
    ("step time, later steps, CPU (s)", None, "later_step_cpu_seconds", "{:.2f}", 1),
    ("checkpoint: trainable + AdamW (MB)", None, "checkpoint_bytes", "{:.1f}", 1e6),
]


def print_table(results: dict) -> None:
    head = f"| {'':<36} | {'full pred':>11} | {'full meas':>11} | {'LoRA pred':>11} | {'LoRA meas':>11} |"
    print(head + f" {'LoRA/full meas':>14} |")
    print("|" + "|".join("-" * n for n in (38, 13, 13, 13, 13, 16)) + "|")
    for label, pkey, mkey, fmt, scale in ROWS:
        cells = []
        for name in ("full", "lora"):
            pred = results[name]["predicted"].get(pkey) if pkey else None
            cells += [
                fmt.format(pred / scale) if pred is not None else "",
                fmt.format(results[name]["measured"][mkey] / scale),
            ]
        ratio = results["lora"]["measured"][mkey] / results["full"]["measured"][mkey]
        print(f"| {label:<36} | " + " | ".join(f"{c:>11}" for c in cells) + f" | {ratio:>14.3f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=list(SIZES))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (the first creates AdamW's state)")
    p.add_argument("--rounds", type=int, default=3, help="timing processes per side, alternating full and LoRA")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    quiet(args.threads)
    if args.child:
        job = json.loads(args.child)
        child_result(run_side(setup_from_json(job["setup"]), job["steps"], job["alpha"], job["memory"]))
        return 0

    full = PlanSetup(
        SIZES[args.model], seq_len=args.seq_len, micro_batch=args.micro_batch, precision="fp32", device="cpu"
    )
    sides = {"full": full, "lora": full.with_(lora_r=args.r)}
    rates = calibrate(torch.device("cpu"), None, full.config.n_embd, full.tokens, 1 << 24)
    measured = measure_sides(sides, args)
    results = {name: {"predicted": predict(s, rates), "measured": measured[name]} for name, s in sides.items()}
    for r in results.values():
        r["ratios"] = {
            k: r["measured"][k] / r["predicted"][k] for k in ("first_step_peak", "peak", "first_step_seconds")
        }

    print(
        f"\n{args.model} (random init), seq {args.seq_len} x micro-batch {args.micro_batch}, fp32, CPU, "
        f"{args.threads} thread(s), torch {torch.__version__}; LoRA r={args.r} alpha={args.alpha:g} on "
        f"{', '.join(sides['lora'].lora_targets)}; time: {args.rounds} processes x {args.steps} steps per side"
    )
    print_table(results)
    print(
        "measured/predicted: "
        + "; ".join(f"{n} " + ", ".join(f"{k} {v:.3f}" for k, v in results[n]["ratios"].items()) for n in results)
    )
    lora, base = results["lora"]["measured"], results["full"]["measured"]
    record = {
        "benchmark": "lora_vs_full",
        "model": args.model,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "precision": "fp32",
        "device": "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "lora_config": {"r": args.r, "alpha": args.alpha, "targets": list(sides["lora"].lora_targets)},
        "steps": args.steps,
        "rounds": args.rounds,
        "calibration": rates,
        "load_average": os.getloadavg()[0],
        **results,
        "lora_over_full": {
            k: lora[k] / base[k]
            for k in ("peak", "first_step_peak", "later_step_seconds", "later_step_cpu_seconds", "checkpoint_bytes")
        },
    }
    emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
