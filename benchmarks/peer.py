"""What every peer benchmark (qatune against another library on the same work) shares.

Each side runs in its own subprocess, so its peak RSS is its own: the parent calls
`run_side(script, side, argv, work)`, the child (the same script with `--side`) runs the side
inside `measure_side(...)`, which prints one `RESULT {json}` line the parent reads back. Every side
uses the same thread count, and the matmul throughput is measured inside each child, under the
same conditions as its training (other processes may share the cores).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QATUNE_SHARED", REPO.parent / "shared"))
RESULT = "RESULT "


def tokenizer():
    from qatune.model.tokenizer import load_tokenizer

    return load_tokenizer(SHARED / "tokenizer" / "gpt2")


def matmul_peak(precision: str = "fp32", seconds: float = 2.0) -> tuple[float, float]:
    """FLOP/s of a large square matmul, measured here with the current thread count: per second of
    wall time, and per second of this process's CPU time."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    flop = n * 2 * 1024**3
    return flop / (time.perf_counter() - t0), flop / (time.process_time() - c0)


def measure_side(
    run: Callable[[], dict], precision: str = "fp32", finish: Callable[[dict], None] | None = None
) -> None:
    """Child: run one side and print its RESULT line with peak RSS (training's high-water mark,
    taken before `finish` scores the model), CPU seconds, load average and matmul peak."""
    load_before = os.getloadavg()[0]
    peak, peak_cpu = matmul_peak(precision)  # under the same conditions as this side's training
    stats = run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats["peak_rss_mb"] = usage.ru_maxrss / 1024
    stats["cpu_s"] = usage.ru_utime + usage.ru_stime  # CPU time of the whole child, setup included
    stats["load_avg"] = [load_before, os.getloadavg()[0]]  # 1-minute load: other processes on the cores
    stats["matmul_peak"], stats["matmul_peak_cpu"] = peak, peak_cpu
    if finish is not None:
        finish(stats)
    print(RESULT + json.dumps(stats), flush=True)


def run_side(script: str, side: str, argv: list[str], work: Path) -> dict:
    """Parent: run `script --side SIDE` in a fresh process and return its RESULT."""
    cmd = [sys.executable, script, *argv, "--side", side, "--workdir", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT) :])
