"""Peak memory and step time of a short SFT run at GPT-2 sizes, in fp32 and bf16, with and without
keeping freed memory mapped ($QATUNE_MALLOC=keep | glibc, `qatune.utils.malloc`), against the
planner's prediction (`qatune plan`).

Each configuration is one fresh process running `qatune.launch.fit` as a user's run does (random
init of the named size, packed batches, held-out evaluation at the end, export), on synthetic Q&A
pairs whose encodings are `--min-len`..`--max-len` tokens: each example fills most of a row, so a
micro-batch is `--batch` rows of a length that varies from step to step (the packed shapes a real
data set gives). After every step the child records its RSS, its high-water mark (VmHWM) and
glibc's own account (mallinfo2: bytes in use, bytes freed but still mapped, mmapped bytes).

Reported per configuration: median step time (wall and CPU, steps after the first), the peak RSS
of the training steps, of the whole process (the end's evaluation and export included), the RSS
before the model existed (Python, torch, tokenizer, data), and the planner's peak for
`--batch` x `--max-len` (it counts tensors, so it is compared with the peak minus that base).

    python -m benchmarks.memory_precision                       # gpt2, 4 steps, batch 8 x 512, 1 thread
    python -m benchmarks.memory_precision --model gpt2-medium --steps 3 --configs bf16:keep fp32:keep

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import time
from pathlib import Path

from benchmarks import harness
from qatune.utils.malloc import KERNEL_CACHE_ENV

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had not but "
    "one all their they more its also first two new after been would who when time years people other some only into"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="a size name (random init)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=8, help="examples per micro-batch (one per row at these lengths)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--min-len", type=int, default=400, help="shortest example, in tokens")
    p.add_argument(
        "--configs",
        nargs="+",
        default=["fp32:keep", "fp32:glibc", "bf16:keep", "bf16:glibc"],
        help="precision:malloc[:primitive cache capacity]",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # child: one configuration
    return p.parse_args(argv)


def write_data(args, work: Path) -> None:
    """Q&A pairs of `--min-len`..`--max-len` tokens (about half prompt, half answer), seeded."""
    tok, rng, words = harness.tokenizer(), random.Random(0), WORDS.split()
    n = args.batch * args.steps + 8  # the training steps' examples, plus a held-out set of 8
    with open(work / "train.jsonl", "w", encoding="utf-8") as f:
        for _ in range(n):
            target = rng.randint(args.min_len, args.max_len - 16)
            text = [rng.choice(words) for _ in range(target)]
            while len(tok(" ".join(text))["input_ids"]) > target:
                text.pop()
            half = len(text) // 2
            f.write(json.dumps({"question": " ".join(text[:half]), "answer": " ".join(text[half:])}) + "\n")


# ---------------------------------------------------------------- child: one configuration


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args) -> None:
    precision, malloc, *caches = args.side.split(":")
    os.environ["QATUNE_MALLOC"] = malloc  # read when the run starts
    for name in KERNEL_CACHE_ENV:  # a third field: oneDNN's and ideep's cache capacity (1024: theirs)
        if caches:
            os.environ[name] = caches[0]
    import torch

    from qatune.config import from_dict
    from qatune.data.pipeline import DataConfig, load_examples
    from qatune.launch import fit
    from qatune.methods.config import TrainConfig
    from qatune.train.runtime import make_model
    from qatune.utils.malloc import heap_info

    work = Path(args.workdir)
    tok = harness.tokenizer()
    data = {"sources": [str(work / "train.jsonl")], "max_len": args.max_len}
    examples = load_examples(DataConfig(**data), tok).examples
    settings = harness.run_settings(args.threads, eval={"fraction": 8 / len(examples), "every": 0})
    cfg = from_dict(
        TrainConfig,
        settings
        | {
            "name": args.side.replace(":", "_"),
            "out_dir": str(work / "runs"),
            "model": {"name": args.model, "init": "random"},
            "data": data,
            "batch": {"size": args.batch},
            "max_steps": args.steps,
            "precision": precision,
            "optim": {"warmup_steps": 1},
        },
    )
    base_kb = _status_kb("VmRSS")  # before the model exists
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model, len(tok))
    steps: list[dict] = []
    clock = [time.perf_counter(), time.process_time()]

    def on_step(record: dict) -> None:
        now = [time.perf_counter(), time.process_time()]
        steps.append(
            {
                "step": record["step"],
                "wall_s": now[0] - clock[0],
                "cpu_s": now[1] - clock[1],
                "tokens": record.get("tokens"),
                "rss_mb": _status_kb("VmRSS") / 1024,
                "hwm_mb": _status_kb("VmHWM") / 1024,
                "heap": {k: v / 2**20 for k, v in (heap_info() or {}).items()},  # MB
                "eval": "eval_loss" in record,
            }
        )
        clock[:] = now

    load_before = os.getloadavg()[0]
    result = fit(model, tok, examples, cfg, progress=False, on_step=on_step, overwrite=True)
    harness.child_result(
        {
            "steps": steps,
            "trained": result.steps,
            "base_mb": base_kb / 1024,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_avg": [load_before, os.getloadavg()[0]],
            "final_loss": result.history[-1]["loss"],
        }
    )


# ---------------------------------------------------------------- parent


def planned(args, precision: str) -> dict:
    from qatune.analysis.memory import plan_memory
    from qatune.analysis.setup import PlanSetup
    from qatune.model.gpt2 import SIZES

    # As `qatune check` sets the plan up for a run: packed rows on the CPU, half the positions labelled
    # (these examples: about half prompt, half answer).
    s = PlanSetup(
        SIZES[args.model], seq_len=args.max_len, micro_batch=args.batch, precision=precision, packed=True, device="cpu"
    )
    plan = plan_memory(s)
    return {"first_step_peak_mb": plan.first_step_peak / 2**20, "peak_mb": plan.peak / 2**20}


def summarize(side: str, r: dict, plan: dict) -> dict:
    steps = [s for s in r["steps"] if not s["eval"]]
    later = steps[1:] or steps
    train_peak = max(s["hwm_mb"] for s in steps)
    last = r["steps"][-1]["heap"]
    return {
        "config": side,
        "step_wall_s": statistics.median(s["wall_s"] for s in later),
        "step_cpu_s": statistics.median(s["cpu_s"] for s in later),
        "train_peak_mb": train_peak,
        "process_peak_mb": r["peak_rss_mb"],
        "base_mb": r["base_mb"],
        "train_peak_minus_base_mb": train_peak - r["base_mb"],
        "heap_free_mb_end": last.get("free_in_heap"),
        "heap_in_use_mb_end": last.get("in_use"),
        "plan_peak_mb": plan["peak_mb"],  # a later step's: the optimizer state exists from the first update on
        "plan_vs_measured": (train_peak - r["base_mb"]) / plan["peak_mb"],
        "load_avg": r["load_avg"],
        "final_loss": r["final_loss"],
        "per_step": r["steps"],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if harness.ran_child(args, child):
        return
    work = harness.workdir(args.workdir, "memory_precision")
    write_data(args, work)
    argv_child = [
        "--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch), "--max-len", str(args.max_len),
        "--threads", str(args.threads),
    ]  # fmt: skip
    rows = []
    for side in args.configs:
        r = harness.run_side(__file__, side, argv_child, work)
        rows.append(summarize(side, r, planned(args, side.split(":")[0])))
        print(f"  {side}: done, peak {rows[-1]['process_peak_mb']:,.0f} MB", flush=True)
    print(
        f"\n{args.model}, {args.steps} steps of {args.batch} examples x {args.min_len}-{args.max_len} tokens, "
        f"{args.threads} thread(s); step times: median of steps 2..{args.steps}"
    )
    head = "| precision:malloc | step wall s | step CPU s | train peak RSS | whole process | base | peak - base "
    print(head + "| plan | (peak - base) / plan | heap free, end | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        print(
            f"| {x['config']} | {x['step_wall_s']:.2f} | {x['step_cpu_s']:.2f} | {x['train_peak_mb']:,.0f} MB "
            f"| {x['process_peak_mb']:,.0f} MB | {x['base_mb']:,.0f} MB | {x['train_peak_minus_base_mb']:,.0f} MB "
            f"| {x['plan_peak_mb']:,.0f} MB | {x['plan_vs_measured']:.2f} "
            f"| {x['heap_free_mb_end'] or 0:,.0f} MB "
            f"| {x['load_avg'][0]:.1f} / {x['load_avg'][1]:.1f} |"
        )
    harness.emit({"benchmark": "memory_precision", "args": vars(args) | {"workdir": str(work)}, "rows": rows})


if __name__ == "__main__":
    main()
