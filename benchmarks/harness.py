"""What every benchmark shares: the run settings, the machine's description, the per-side child
process and the JSON line.

    python -m benchmarks.sft_vs_trl --help        # from the repository root; every script alike

- `quiet(threads)`: the thread count every side and child uses (torch, OpenMP and MKL alike). On
  a machine whose cores other processes also use, a 2-thread PyTorch step was measured 4-5x slower
  than a 1-thread one (OpenMP threads wait on each other), so the scripts default to 1.
  `run_settings(...)` / `library_settings(seed)`: a qatune run, or a TRL trainer, that writes
  nothing the measurement does not read (no checkpoints, logs, plots or progress bars).
- `cpu_info()` / `emit(record)`: the CPU model and the flags that pick PyTorch's CPU kernels
  (amx_bf16, avx512_bf16, avx2): the same code is faster, and rounds differently in bf16, on
  another CPU, so every result says where it was measured. `emit` prints that line and then the
  result as one JSON line (the last line of the output), with the CPU in it.
- Each side in its own process, so its peak RSS is its own: the parent calls
  `run_side(__file__, side, argv, work)` (or `run_child` for other child arguments); the child
  (the same module with `--side`, dispatched by `ran_child`) runs inside `measure_side(...)`, or
  prints its own stats with `child_result(stats)`: one `RESULT {json}` line with its peak RSS and
  CPU seconds, which the parent reads back. The matmul throughput is measured inside each child,
  under the same conditions as its training.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QATUNE_SHARED", REPO.parent / "shared"))
RESULT = "RESULT "
KERNEL_FLAGS = ("amx_bf16", "avx512_bf16", "avx2")


def quiet(threads: int) -> None:
    """Run this process, and every child it starts, on `threads` threads."""
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)  # children inherit it
    torch.set_num_threads(threads)


def run_settings(threads: int | None = None, **more) -> dict:
    """The training-config keys of a measured qatune run: on the CPU (on `threads` threads when
    given), no held-out split, and nothing written that the measurement does not read (no periodic
    checkpoint, TensorBoard log or plots); `more` adds or overrides keys."""
    out = {"device": "cpu", "eval": {"fraction": 0.0}, "save_every": 0, "tensorboard": False, "plots": False}
    if threads is not None:
        out["threads"] = threads
    return out | more


def library_settings(seed: int) -> dict:
    """The same for a library's (TRL's) trainer config: on the CPU, seeded, no report, no saved
    checkpoint, no data-loader workers, no progress bar."""
    return {
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "seed": seed,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def ran_child(args, child: Callable) -> bool:
    """A side-by-side benchmark's start: its threads (`quiet`); in a child process (`--side`), run
    `child(args)` and return True (the parent's work is not this process's)."""
    quiet(args.threads)
    if args.side:
        child(args)
    return bool(args.side)


def workdir(given: str | None, name: str) -> Path:
    """The folder a benchmark keeps its data and models in: `given` (--workdir, kept), or a new
    temporary one that is removed when the benchmark exits (a 355M run leaves ~7 GB of models and
    checkpoints behind; a few such runs filled this machine's disk)."""
    if given:
        work = Path(given)
        work.mkdir(parents=True, exist_ok=True)
        return work
    work = Path(tempfile.mkdtemp(prefix=f"{name}."))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    # a benchmark stopped by `kill` (SIGTERM) exits through atexit too: the folder goes with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return work


def tokenizer():
    from qatune.model.tokenizer import load_tokenizer

    return load_tokenizer(SHARED / "tokenizer" / "gpt2")


def library_side(data_file: Path, padding_side: str | None = "right", tokenizer=None):
    """(the tokenizer (GPT-2's unless given), padded on `padding_side` unless None, the JSONL
    dataset) for a library's (TRL's) side, with Python warnings off: its deprecation notes would
    bury the table."""
    import warnings

    from datasets import load_dataset

    warnings.filterwarnings("ignore")
    tok = tokenizer if tokenizer is not None else globals()["tokenizer"]()
    if padding_side is not None:
        tok.padding_side = padding_side
    return tok, load_dataset("json", data_files=str(data_file), split="train")


# ---------------------------------------------------------------- the machine


@cache
def cpu_info() -> dict:
    """{model, cores, flags: {amx_bf16, avx512_bf16, avx2: bool}} from lscpu (or /proc/cpuinfo)."""
    text = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # no lscpu: /proc/cpuinfo below
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model, flags = fields.get("Model name", ""), set(fields.get("Flags", "").split())
    if not flags and Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                flags = set(value.split())
            elif key.strip() == "model name" and not model:
                model = value.strip()
    return {"model": model or "unknown", "cores": os.cpu_count(), "flags": {f: f in flags for f in KERNEL_FLAGS}}


def describe_cpu() -> str:
    info = cpu_info()
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in info["flags"].items())
    return f"CPU: {info['model']}, {info['cores']} cores; {flags}"


def emit(record: dict) -> None:
    """The result: the CPU it was measured on, then one JSON line (the output's last line)."""
    print(describe_cpu())
    print(json.dumps(record | {"cpu": cpu_info()}, default=str), flush=True)


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


# ---------------------------------------------------------------- one side per process


def child_result(stats: dict) -> None:
    """Child: print `stats` as the RESULT line, with this process's peak RSS and CPU seconds
    (unless the side measured its own)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats.setdefault("peak_rss_mb", usage.ru_maxrss / 1024)
    stats.setdefault("cpu_s", usage.ru_utime + usage.ru_stime)  # the whole child, setup included
    print(RESULT + json.dumps(stats), flush=True)


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
    child_result(stats)


def run_child(script: str, argv: list[str], what: str, env: dict | None = None) -> dict:
    """Parent: run benchmark `script` (its __file__) as `python -m benchmarks.NAME ARGV` in a fresh
    process and return its RESULT; `what` names it in the error when it fails."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", f"benchmarks.{Path(script).stem}", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT) :])


def run_side(script: str, side: str, argv: list[str], work: Path) -> dict:
    """Parent: run `script --side SIDE --workdir WORK` in a fresh process and return its RESULT."""
    return run_child(script, [*argv, "--side", side, "--workdir", str(work)], side)
