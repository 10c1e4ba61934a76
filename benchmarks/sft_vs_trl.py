"""qatune's training loop against TRL's SFTTrainer on the same work, on this machine's CPU.

Same tiny GPT-2 (4 layers, d=256, same random initial weights, saved once and loaded by both),
same fixed sample of real t0 Q&A examples (../shared/data/t0_qa_subset, only examples whose
prompt + answer + EOS fit in max_len, so neither side truncates), one epoch, the same batch of 8
examples per optimizer step (TRL with packing: 8 packed rows per step, its own batching), the
same AdamW (no weight decay on either side, so no disagreement about which tensors decay), the
same warmup + cosine to lr_min, clipping at 1.0, the same precision. Loss on the answer only
(TRL: completion_only_loss). Each side runs in its own subprocess, so its peak RSS is its own.
Both trained models are scored by the same code: qatune's held-out response-token loss.

MFU = the FLOPs the work needs (real tokens only: 6 x 12 L d^2 per token for the blocks,
attention scores over each example's own causal prefix, the LM head and the last block past its
keys and values only where there is a label)
over the matmul throughput this script measures on the same threads, in the same precision. It is
given twice: on wall time (what a user waits for) and on the process's CPU time against a CPU-time
matmul peak (what the step itself costs: other processes sharing the cores inflate wall time, not
CPU time).

The qatune side then trains once more under torch.profiler and sums the runtime's named spans
(`qatune.train.step.phase`): data, forward, loss, backward, optimizer, monitor, logging,
checkpoint; with the FLOPs of each phase, the rate each one reaches.

    python -m benchmarks.sft_vs_trl                     # 1,000 examples, all four sides
    python -m benchmarks.sft_vs_trl --n-train 200 --sides qatune trl-default
Needs the `bench` extra: pip install -e '.[bench]'  (trl, psutil).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from benchmarks import harness

SIDES = ("qatune", "trl-default", "trl-packing", "trl-chunked")
MODEL = {"n_layer": 4, "n_embd": 256, "n_head": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-heldout", type=int, default=100)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-min", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="both sides (TRL's CPU default: bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for every side")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--op-profile", type=int, default=0, metavar="N", help="also print torch.profiler's N costliest ops")
    p.add_argument("--workdir", default=None, help="keep data/models here (default: a temp folder)")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


# ---------------------------------------------------------------- shared preparation (parent)


def prepare(args, work: Path) -> dict:
    """Pick the examples, write them as prompt/completion JSONL, save the initial model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from qatune.data.encode import encode_records
    from qatune.data.readers import read_records
    from qatune.data.templates import get_template

    tok = harness.tokenizer()
    records = read_records([str(harness.SHARED / "data" / "t0_qa_subset" / "*.jsonl")], None, False, None).records
    encodings = encode_records(records, get_template("raw"), tok)
    fits = [i for i, e in enumerate(encodings) if len(e) <= args.max_len]
    rng = random.Random(args.seed)
    chosen = rng.sample(fits, args.n_train + args.n_heldout)
    for name, idx in (("train", chosen[: args.n_train]), ("heldout", chosen[args.n_train :])):
        with open(work / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in idx:
                completion = records[i].response.removesuffix("<|endoftext|>")
                f.write(json.dumps({"prompt": records[i].prompt, "completion": completion}) + "\n")
    torch.manual_seed(args.seed)
    hf = GPT2Config(
        vocab_size=len(tok), n_positions=args.max_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **MODEL
    )
    GPT2LMHeadModel(hf).save_pretrained(work / "init")
    train_enc = [encodings[i] for i in chosen[: args.n_train]]
    return {
        "examples": len(train_enc),
        "lengths": [len(e) for e in train_enc],
        "labels": [e.n_label_tokens for e in train_enc],
    }


def forward_flops(lengths: list[int], labels: list[int], vocab: int) -> dict[str, float]:
    """Forward FLOPs the work needs, real tokens only, by part; training is 3x (forward + backward)."""
    L, d = MODEL["n_layer"], MODEL["n_embd"]
    parts = {"blocks": 0.0, "attention": 0.0, "head": 0.0}
    for T, n_lab in zip(lengths, labels):
        # qkv, proj, mlp matmuls; the last block's output is read only where a label is, so
        # elsewhere it needs only the keys and values (2 d^2 of its 12 d^2)
        parts["blocks"] += 2 * d * d * (12 * L * T - 10 * (T - n_lab))
        # QK^T and AV over each query's causal prefix; in the last block only the label rows'
        # queries (the answer's rows T-n_lab-1 .. T-2 read T-n_lab .. T-1 keys)
        parts["attention"] += 2 * 2 * d * ((L - 1) * T * (T + 1) / 2 + n_lab * (2 * T - n_lab - 1) / 2)
        parts["head"] += 2 * d * vocab * n_lab  # LM head only where a label is
    return parts


def work_flops(lengths: list[int], labels: list[int], vocab: int) -> float:
    """Training FLOPs the work needs: 3x the forward (forward + backward), real tokens only."""
    return 3 * sum(forward_flops(lengths, labels, vocab).values())


def phase_flops(lengths: list[int], labels: list[int], vocab: int) -> dict[str, float]:
    """The same FLOPs by phase of qatune's step: the loss phase runs the head's forward and both
    of its gradient matmuls (they are formed in the forward pass)."""
    f = forward_flops(lengths, labels, vocab)
    body = f["blocks"] + f["attention"]
    return {"forward": body, "loss": 3 * f["head"], "backward": 2 * body}


# ---------------------------------------------------------------- the sides (children)


def heldout_loss(model, work: Path, max_len: int) -> float:
    """The same scorer for every side: qatune's response-token loss on the held-out examples, fp32."""
    import torch

    from qatune.data.pipeline import DataConfig, load_examples
    from qatune.data.plan import eval_batches
    from qatune.methods.sft.step import evaluate
    from qatune.train.step import Precision

    tok = harness.tokenizer()
    ex = load_examples(DataConfig(sources=[str(work / "heldout.jsonl")], template="raw", max_len=max_len), tok)
    batches = eval_batches(ex.examples, "grouped", max_len, tok.pad_token_id, 8)
    return evaluate(model, batches, Precision("fp32", torch.device("cpu")))["eval_loss"]


def run_qatune(args, work: Path, name: str = "qatune", max_steps: int | None = None, overrides=None) -> dict:
    from qatune.config import from_dict
    from qatune.data.pipeline import DataConfig, load_examples
    from qatune.launch import fit
    from qatune.methods.config import TrainConfig
    from qatune.model.hf_io import from_pretrained

    t_start = time.perf_counter()
    tok = harness.tokenizer()
    data = DataConfig(sources=[str(work / "train.jsonl")], template="raw", max_len=args.max_len)
    examples = load_examples(data, tok).examples
    model = from_pretrained(work / "init")
    cfg = from_dict(
        TrainConfig,
        {
            "name": name,
            "max_steps": max_steps,
            "data": {"sources": data.sources, "template": "raw", "max_len": args.max_len},
            "out_dir": str(work / "runs"),
            "batch": {"strategy": "packed", "size": args.batch, "unit": "examples"},
            "optim": {"lr": args.lr, "lr_min": args.lr_min, "warmup_steps": args.warmup, "weight_decay": 0.0},
            **harness.run_settings(export=False),
            "precision": args.precision,
            "seed": args.seed,
        }
        | (overrides or {}),
    )
    t0, c0 = time.perf_counter(), time.process_time()
    result = fit(model, tok, examples, cfg, progress=False, overwrite=True)  # a kept --workdir: rerun in place
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    h = result.history
    return {
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "total_s": time.perf_counter() - t_start,
        "steps": result.steps,
        "examples": sum(r["examples"] for r in h),
        "tokens": sum(r["tokens"] for r in h),
        "label_tokens": sum(r["label_tokens"] for r in h),
        "final_train_loss": h[-1]["loss"],
        "model": model,
    }


def micro_batches(args, work: Path):
    """(the initial model, the training examples as packed micro-batches of `args.batch`, in
    order, on CPU) for measurements that step the model in one process."""
    from qatune.data.pipeline import DataConfig, load_examples
    from qatune.data.plan import make_batch
    from qatune.model.hf_io import from_pretrained

    data = DataConfig(sources=[str(work / "train.jsonl")], template="raw", max_len=args.max_len)
    examples = load_examples(data, harness.tokenizer()).examples
    size = args.batch
    batches = [make_batch(examples[i : i + size], "packed", args.max_len, 0) for i in range(0, len(examples), size)]
    return from_pretrained(work / "init"), [b.to("cpu") for b in batches]  # .to(): builds the label index


def run_trl(args, work: Path, side: str) -> dict:
    from transformers import GPT2LMHeadModel
    from trl import SFTConfig, SFTTrainer

    from qatune.model.hf_io import from_pretrained

    t_start = time.perf_counter()
    tok, dataset = harness.library_side(work / "train.jsonl")
    model = GPT2LMHeadModel.from_pretrained(work / "init", attn_implementation="sdpa")
    config = SFTConfig(
        output_dir=str(work / side),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": args.lr_min},
        warmup_steps=args.warmup,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        max_length=args.max_len,
        packing=side == "trl-packing",
        loss_type="chunked_nll" if side == "trl-chunked" else "nll",
        completion_only_loss=True,
        bf16=args.precision == "bf16",
        **harness.library_settings(args.seed),
        logging_steps=10,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)
    t0, c0 = time.perf_counter(), time.process_time()
    out = trainer.train()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    model.save_pretrained(work / side / "final")
    return {
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "total_s": time.perf_counter() - t_start,
        "steps": out.global_step,
        "examples": args.n_train,
        # TRL 1.16 tokenizes in its collator; the work is the same examples, counted by the parent
        "tokens": None,
        "label_tokens": None,
        "final_train_loss": out.training_loss,
        "model": from_pretrained(work / side / "final"),
    }


PHASES = ("data", "forward", "loss", "backward", "optimizer", "monitor", "logging", "checkpoint")


def profile_phases(args, work: Path) -> dict:
    """The qatune run once more, timed by phase (`qatune.train.step.PhaseClock`: the runtime's
    named spans, wall and CPU seconds of the training thread), and with `--op-profile N` once
    more under torch.profiler for the N costliest operators."""
    try:
        from qatune.train.step import PhaseClock
    except ImportError:  # a qatune older than the named phases (comparing against an old checkout)
        return None
    with PhaseClock() as clock:
        stats = run_qatune(args, work, name="qatune-phases")
    out = {"train_s": stats["train_s"], "train_cpu_s": stats["train_cpu_s"], "wall": clock.wall, "cpu": clock.cpu}
    if args.op_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run_qatune(args, work, name="qatune-profiled")
        ops = prof.key_averages(group_by_input_shape=True)
        out["op_table"] = ops.table(sort_by="self_cpu_time_total", row_limit=args.op_profile)
    return out


def child(args) -> None:
    work = Path(args.workdir)
    side = lambda: run_qatune(args, work) if args.side == "qatune" else run_trl(args, work, args.side)

    def score(stats: dict) -> None:
        stats["heldout_loss"] = heldout_loss(stats.pop("model"), work, args.max_len)
        if args.side == "qatune":  # after the peak RSS was read: the profiler's records are not training's
            phases = profile_phases(args, work)
            if phases is not None:
                stats["phases"] = phases

    harness.measure_side(side, args.precision, finish=score)


# ---------------------------------------------------------------- report (parent)


def child_argv(args) -> list[str]:
    keys = ("n_train", "n_heldout", "max_len", "batch", "lr", "lr_min", "warmup", "precision", "seed", "threads")
    keys += ("op_profile",)
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def run_one(side: str, args, work: Path) -> dict:
    return harness.run_side(__file__, side, child_argv(args), work)


def info_work(info: dict) -> tuple[list[int], list[int], int]:
    return info["lengths"], info["labels"], 50257


def print_phases(phases: dict, flops: dict[str, float], peak: float, peak_cpu: float) -> dict:
    """The phase-timed qatune run: wall and CPU seconds per phase, and for the phases that do the
    model's matmuls the FLOP rate reached per CPU second, against the CPU-time matmul peak."""
    total, total_cpu = phases["train_s"], phases["train_cpu_s"]
    if "op_table" in phases:
        print("\nqatune's costliest operators (torch.profiler, one more run)\n" + phases.pop("op_table"))
    print(f"\nqatune by phase (the same run again, timed by phase: {total:.1f} s wall, {total_cpu:.1f} s CPU)")
    print(f"{'phase':<12}{'wall s':>8}{'CPU s':>8}{'CPU share':>10}{'GFLOP':>8}{'GFLOP/CPU s':>12}{'of peak':>9}")
    out = {}
    for name in (*PHASES, "other"):
        if name == "other":  # the loop's own code, run setup and teardown outside any phase
            wall, cpu = total - sum(phases["wall"].values()), total_cpu - sum(phases["cpu"].values())
        else:
            wall, cpu = phases["wall"].get(name, 0.0), phases["cpu"].get(name, 0.0)
        row = {"wall_s": wall, "cpu_s": cpu, "cpu_share": cpu / total_cpu}
        line = f"{name:<12}{wall:>8.2f}{cpu:>8.2f}{100 * row['cpu_share']:>9.1f}%"
        if name in flops and cpu > 0:
            row["gflop"], row["gflop_per_cpu_s"] = flops[name] / 1e9, flops[name] / cpu / 1e9
            row["of_peak_cpu"] = flops[name] / cpu / peak_cpu
            line += f"{row['gflop']:>8.1f}{row['gflop_per_cpu_s']:>12.1f}{100 * row['of_peak_cpu']:>8.1f}%"
        out[name] = row
        print(line)
    # The training step itself: what each optimizer step costs, without the run's one-off work
    # (checkpoint, setup) or the loop's bookkeeping.
    step = ("forward", "loss", "backward", "optimizer")
    cpu = sum(out[n]["cpu_s"] for n in step)
    gflop = sum(flops.get(n, 0.0) for n in step) / 1e9
    of_peak = gflop * 1e9 / cpu / peak_cpu
    out["step"] = {"cpu_s": cpu, "gflop": gflop, "gflop_per_cpu_s": gflop / cpu, "of_peak_cpu": of_peak}
    print(
        f"{'step':<12}{'':>8}{cpu:>8.2f}{100 * cpu / total_cpu:>9.1f}%{gflop:>8.1f}{gflop / cpu:>12.1f}"
        f"{100 * of_peak:>8.1f}%   (forward + loss + backward + optimizer)"
    )
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    if harness.ran_child(args, child):
        return

    work = harness.workdir(args.workdir, "sft_vs_trl")
    info = prepare(args, work)
    flops = work_flops(info["lengths"], info["labels"], 50257)
    peak, peak_cpu = harness.matmul_peak(args.precision)
    results = {}
    for side in args.sides:
        results[side] = run_one(side, args, work)
        print(f"  {side}: {results[side]['train_s']:.1f} s", file=sys.stderr, flush=True)
    # The machine's matmul throughput: the best of the measurements (others may share the cores).
    peak = max([peak] + [r["matmul_peak"] for r in results.values()])
    peak_cpu = max([peak_cpu] + [r["matmul_peak_cpu"] for r in results.values()])
    base = results.get("qatune")
    header = f"{'side':<13}{'train s':>9}{'ex/s':>8}{'tok/s':>9}{'label tok/s':>12}{'peak RSS MB':>12}"
    header += f"{'held-out loss':>14}{'MFU':>7}{'CPU MFU':>8}{'load':>6}{'speed-up':>9}{'RSS x':>7}{'loss x':>8}"
    print(
        f"\n{args.n_train} t0 examples (<= {args.max_len} tokens), batch {args.batch}, 1 epoch, {args.precision}, "
        f"GPT-2 L={MODEL['n_layer']} d={MODEL['n_embd']}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; matmul peak {peak / 1e9:.0f} GFLOP/s per wall second, {peak_cpu / 1e9:.0f} per CPU second "
        "(best measured)"
    )
    print(header)
    summary = {}
    for side, r in results.items():
        if r["tokens"] is None:
            r["tokens"], r["label_tokens"] = sum(info["lengths"]), sum(info["labels"])
        mfu, mfu_cpu = flops / r["train_s"] / peak, flops / r["train_cpu_s"] / peak_cpu
        row = {
            "train_s": r["train_s"],
            "examples_per_s": r["examples"] / r["train_s"],
            "tokens_per_s": r["tokens"] / r["train_s"],
            "label_tokens_per_s": r["label_tokens"] / r["train_s"],
            "peak_rss_mb": r["peak_rss_mb"],
            "heldout_loss": r["heldout_loss"],
            "mfu": mfu,
            "train_cpu_s": r["train_cpu_s"],
            "mfu_cpu": mfu_cpu,
            "steps": r["steps"],
            "load_avg": r["load_avg"],
        }
        if base and side != "qatune":
            row["qatune_speedup"] = r["train_s"] / base["train_s"]
            row["qatune_rss_ratio"] = base["peak_rss_mb"] / r["peak_rss_mb"]
            row["qatune_loss_ratio"] = base["heldout_loss"] / r["heldout_loss"]
        summary[side] = row
        ratios = (
            f"{row['qatune_speedup']:>8.1f}x{row['qatune_rss_ratio']:>7.2f}{row['qatune_loss_ratio']:>8.3f}"
            if "qatune_speedup" in row
            else f"{'':>9}{'':>7}{'':>8}"
        )
        print(
            f"{side:<13}{row['train_s']:>9.1f}{row['examples_per_s']:>8.2f}{row['tokens_per_s']:>9.0f}"
            f"{row['label_tokens_per_s']:>12.0f}{row['peak_rss_mb']:>12.0f}{row['heldout_loss']:>14.4f}"
            f"{100 * mfu:>6.1f}%{100 * mfu_cpu:>7.1f}%{max(r['load_avg']):>6.1f}{ratios}"
        )
    if base and "phases" in base:
        summary["qatune"]["phases"] = print_phases(base["phases"], phase_flops(*info_work(info)), peak, peak_cpu)
    harness.emit({"benchmark": "sft_vs_trl", "args": vars(args) | {"workdir": str(work)}, "results": summary})


if __name__ == "__main__":
    main()
