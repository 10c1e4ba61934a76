"""LoRA vs full fine-tuning: peak memory, step time and checkpoint size, measured side by side with
the planner's predictions, same model and same data.

Each side runs in a fresh Python process (a clean peak RSS; glibc's mmap threshold fixed as for
`qatune plan --measure`), one warm-up step on a 1-layer model first (kernels' first use is not the
model's memory), then `--steps` training steps of the runtime's own step code: `accumulate` with
the SFT step (forward, chunked response-only loss, backward), then `optimizer_step` (clip, fused
AdamW). Random-init weights of the named size; the batch is `qatune.analysis.measure`'s synthetic
one (random ids, the last half of each row labelled), identical on both sides.

    python benchmarks/lora_vs_full.py                    # gpt2, seq 256 x 4, fp32, 1 thread, r=16
    python benchmarks/lora_vs_full.py --model gpt2-medium --steps 3

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time

import torch

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


def run_side(s: PlanSetup, steps: int, alpha: float) -> dict:
    """In the child process: `steps` real training steps of setup `s`, measured."""
    from qatune.analysis.measure import _as_batch, _reset_peak_rss, _rss_kb, measure_step, synthetic_batch
    from qatune.model.gpt2 import GPT2
    from qatune.model.lora import LoRAConfig, apply_lora
    from qatune.train.methods.sft import SFT
    from qatune.train.optim import OptimConfig, build_optimizer
    from qatune.train.state import trainable_state_dict
    from qatune.train.step import Precision, accumulate, optimizer_step

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
    times, peaks = [], []
    for _ in range(steps):
        start = time.perf_counter()
        accumulate(model, SFT.stepper(), [batch], precision)
        optimizer_step(model, optimizer, None, precision, OptimConfig().grad_clip)
        times.append(time.perf_counter() - start)
        peaks.append(_rss_kb("VmHWM") * 1024 - base)
    checkpoint = io.BytesIO()  # what a checkpoint of this run holds (state.pt's model + optimizer)
    torch.save({"model": trainable_state_dict(model), "optimizer": optimizer.state_dict()}, checkpoint)
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_seconds": times,
        "first_step_peak": peaks[0],
        "peak": peaks[-1],
        "checkpoint_bytes": checkpoint.getbuffer().nbytes,
    }


def measure(s: PlanSetup, steps: int, alpha: float, threads: int) -> dict:
    payload = json.dumps({"setup": setup_to_json(s), "steps": steps, "alpha": alpha})
    env = {**os.environ, **MEASURE_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", payload, "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict(s: PlanSetup, rates: dict) -> dict:
    plan, compute = plan_memory(s), plan_compute(s)
    return {
        "trainable": plan.state.trainable,
        "first_step_peak": plan.first_step_peak,
        "peak": plan.peak,
        "step_seconds": estimate_step_seconds(compute.hardware_flops, plan.state.trainable, rates),
        "flops": compute.hardware_flops,
        "state_bytes": plan.state.weights + plan.state.grads + plan.state.optimizer,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=list(SIZES))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--steps", type=int, default=4, help="training steps per side (the first creates AdamW's state)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(run_side(setup_from_json(job["setup"]), job["steps"], job["alpha"])))
        return 0

    full = PlanSetup(
        SIZES[args.model], seq_len=args.seq_len, micro_batch=args.micro_batch, precision="fp32", device="cpu"
    )
    sides = {"full": full, "lora": full.with_(lora_r=args.r)}
    rates = calibrate(torch.device("cpu"), None, full.config.n_embd, full.tokens, 1 << 24)
    results = {}
    for name, s in sides.items():
        measured = measure(s, args.steps, args.alpha, args.threads)
        steady = measured["step_seconds"][1:] or measured["step_seconds"]
        measured["step_seconds_median"] = statistics.median(steady)
        results[name] = {"predicted": predict(s, rates), "measured": measured}
        print(f"{name}: done ({', '.join(f'{t:.1f}' for t in measured['step_seconds'])} s per step)", file=sys.stderr)

    print(
        f"\n{args.model} (random init), seq {args.seq_len} x micro-batch {args.micro_batch}, fp32, CPU, "
        f"{args.threads} thread(s), torch {torch.__version__}; LoRA r={args.r} alpha={args.alpha:g} on "
        f"{', '.join(sides['lora'].lora_targets)}; {args.steps} steps per side, step time = median after the first"
    )
    rows = [
        ("trainable parameters", "trainable", "trainable", "{:,.0f}"),
        ("peak RSS, first step (GB)", "first_step_peak", "first_step_peak", "{:.3f}"),
        ("peak RSS, later steps (GB)", "peak", "peak", "{:.3f}"),
        ("step time (s)", "step_seconds", "step_seconds_median", "{:.2f}"),
        ("checkpoint: trainable + AdamW (MB)", None, "checkpoint_bytes", "{:.1f}"),
    ]
    scale = {"first_step_peak": 1e9, "peak": 1e9, "checkpoint_bytes": 1e6}
    head = f"| {'':<36} | {'full pred':>11} | {'full meas':>11} | {'LoRA pred':>11} | {'LoRA meas':>11} |"
    print(head + f" {'LoRA/full meas':>14} |")
    print("|" + "|".join("-" * n for n in (38, 13, 13, 13, 13, 16)) + "|")
    for label, pkey, mkey, fmt in rows:
        cells, values = [], []
        for name in ("full", "lora"):
            pred = results[name]["predicted"].get(pkey) if pkey else None
            meas = results[name]["measured"][mkey]
            values.append(meas)
            div = scale.get(mkey, 1)
            cells += [fmt.format(pred / div) if pred is not None else "", fmt.format(meas / div)]
        print(f"| {label:<36} | " + " | ".join(f"{c:>11}" for c in cells) + f" | {values[1] / values[0]:>14.3f} |")
    for name in ("full", "lora"):
        r = results[name]
        pairs = (("first_step_peak", "first_step_peak"), ("peak", "peak"), ("step_seconds", "step_seconds_median"))
        r["ratios"] = {k: r["measured"][m] / r["predicted"][k] for k, m in pairs}
    print(
        "measured/predicted: "
        + "; ".join(
            f"{n} " + ", ".join(f"{k} {v:.3f}" for k, v in results[n]["ratios"].items()) for n in ("full", "lora")
        )
    )
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
        "calibration": rates,
        "load_average": os.getloadavg()[0],
        **results,
        "lora_over_full": {
            "peak": results["lora"]["measured"]["peak"] / results["full"]["measured"]["peak"],
            "step_seconds": results["lora"]["measured"]["step_seconds_median"]
            / results["full"]["measured"]["step_seconds_median"],
            "checkpoint_bytes": results["lora"]["measured"]["checkpoint_bytes"]
            / results["full"]["measured"]["checkpoint_bytes"],
        },
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
