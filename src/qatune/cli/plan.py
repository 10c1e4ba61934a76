"""`qatune plan`: memory and compute plan for fine-tuning a GPT-2 or Llama-family model, and, with --measure, one real
training step of that configuration measured against the plan."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from qatune.analysis.accelerators import ACCELERATORS, get_accelerator
from qatune.analysis.setup import ATTENTION, LORA_TARGETS, LOSSES, OFFLOADS, OPTIMIZERS, PRECISIONS, PlanSetup
from qatune.analysis.shapes import is_gpt2
from qatune.errors import UserError
from qatune.model.names import LLAMA_LORA_TARGETS

if TYPE_CHECKING:
    from qatune.analysis.memory import MemoryPlan

CORRECTIONS = [
    "GPT-2 Large (L=36, d=1280, h=20) has ~774M parameters, not 1.5B; 1.5B is GPT-2 XL (L=48, d=1600, h=25).",
    "fp16/bf16 weights take 2 bytes/param: 1.5B params are ~3.1 GB in fp16; ~6 GB is the fp32 size.",
    "Full fine-tuning with mixed-precision AdamW holds ~16 bytes/param of model state (2 bf16 weights + 4 fp32 "
    "master + 2 grads + 8 moments; with autocast: 4 fp32 weights = master + 4 grads + 8 moments): "
    "~12.4 GB for Large, ~24.9 GB for XL, before activations.",
    "Per-token compute is ~6N + 12*L*T*d FLOPs: only the attention part grows with T, so 512 -> 1024 costs "
    "~2.1x per sequence for Large, not ~4x (see the table).",
]


def corrections(s: PlanSetup) -> list[str]:
    """The GPT-2 figures often misquoted: printed with GPT-2 plans only."""
    return CORRECTIONS if is_gpt2(s.config) else []


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory and compute plan for a fine-tuning run", description=__doc__)
    p.add_argument("--model", default="gpt2-large", help="a size (gpt2 … gpt2-xl, smollm2-135m) or a folder")
    p.add_argument("--seq-len", type=int, default=1024, help="row width T (tokens per row)")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per micro-batch per GPU")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    p.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage (3 = FSDP full shard)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel ranks")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--offload", default="none", choices=list(OFFLOADS), help="CPU offload (optimizer, or all)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument(
        "--lora-targets",
        help=f"GPT-2: among {','.join(LORA_TARGETS)}; Llama family: among {','.join(LLAMA_LORA_TARGETS)} "
        "(default: all of the model's, as training adapts)",
    )
    p.add_argument("--loss", default="chunked", choices=list(LOSSES), help="chunked response-only, or full logits")
    p.add_argument("--label-fraction", type=float, default=0.5, help="share of positions with a label")
    p.add_argument("--packed", action="store_true", help="packed rows (block-causal mask)")
    p.add_argument("--attention", default="flash", choices=list(ATTENTION), help="SDPA kernel")
    p.add_argument("--gpu", default="h100-sxm", help=f"accelerator: {', '.join(ACCELERATORS)}")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for the step-time estimate")
    p.add_argument("--measure", action="store_true", help="run one real training step here and compare")
    p.add_argument("--device", default=None, help="for --measure: cpu, cuda … (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def config_for_model(model: str):
    from qatune.cli.info import config_of
    from qatune.model.info import SIZES
    from qatune.runs import resolve_model_path

    return SIZES[model] if model in SIZES else config_of(resolve_model_path(model))


def setup_from_args(args: argparse.Namespace, device: str = "cuda") -> PlanSetup:
    return PlanSetup(
        config=config_for_model(args.model),
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        accum=args.accum,
        precision=args.precision,
        optimizer=args.optimizer,
        zero=args.zero,
        gpus=args.gpus,
        offload=args.offload,
        checkpointing=args.checkpointing,
        lora_r=args.lora_r,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None,
        loss=args.loss,
        label_fraction=args.label_fraction,
        packed=args.packed,
        attention=args.attention,
        device=device,
        name=args.model,
    )


def _gb(n: float) -> str:
    from qatune.analysis.memory import GB

    return f"{n / GB:10.3f}"


def memory_rows(plan: MemoryPlan) -> list[tuple[str, int]]:
    """(label, bytes) rows of the per-GPU table; indented labels are parts of the row above."""
    acts = plan.activations
    rows = list(plan.device.items())
    rows.append(("activations saved for backward", acts.total))
    rows += [(f"  {k}", v) for k, v in acts.saved.items()]
    rows.append(("autocast 16-bit weight copies", acts.weight_copies))
    rows.append(("loss forward transient (one logits chunk)", acts.loss_transient))
    if acts.recompute:
        rows.append(("recomputed block (checkpointing)", acts.recompute))
    rows += [(f"peak at {k}", v) for k, v in plan.phases.items()]
    rows.append(("allowance (fragmentation, CUDA context)", plan.allowance))
    rows.append(("TOTAL per GPU", plan.total_with_allowance))
    return rows


def print_plan(s: PlanSetup, plan: MemoryPlan, acc, mfu: float) -> None:
    from qatune.analysis.compute import plan_compute, seq_len_table, step_time
    from qatune.analysis.memory import GB, advice

    c, st = s.config, plan.state
    heads = f"h={c.n_head}" + (f" kv={c.n_kv_head} hd={c.head_dim} ff={c.d_ff}" if not is_gpt2(c) else "")
    print(f"{s.name}: L={c.n_layer} d={c.n_embd} {heads} V={c.vocab_size}, {st.params / 1e6:.1f}M parameters")
    print(
        f"  seq {s.seq_len} x micro-batch {s.micro_batch} x accum {s.accum} x {s.gpus} GPU(s); {s.precision} "
        f"({s.prec.note}); {s.optimizer}; ZeRO-{s.zero}; offload {s.offload}; checkpointing "
        f"{'on' if s.checkpointing else 'off'}; {'LoRA r=' + str(s.lora_r) if s.lora_r else 'full fine-tune'}; "
        f"{s.loss} loss, {s.label_tokens} label positions per micro-batch"
    )
    print(f"  trainable: {st.trainable / 1e6:.2f}M parameters")
    print("\nMemory per GPU (GB = 1e9 bytes)")
    for label, n in memory_rows(plan):
        print(f"  {label:<48}{_gb(n)}")
    ranks_per_host = min(s.gpus, 8)
    print(f"Per host ({ranks_per_host} GPU(s))")
    print(f"  {'GPU memory, all GPUs of the host':<48}{_gb(plan.total_with_allowance * ranks_per_host)}")
    for k, v in plan.host.items():
        print(f"  {'host memory: offloaded ' + k:<48}{_gb(v)}")
    for n in plan.notes:
        print(f"  note: {n}")
    print()
    for line in advice(s, int(acc.memory_gb * GB), acc.name):
        print(f"  {line}")
    compute = plan_compute(s)
    t = step_time(s, acc, mfu)
    print("\nCompute per micro-batch (forward + backward, model FLOPs)")
    for label, n in (
        ("dense matmuls (6N)", compute.dense),
        ("attention (12*L*T*h*hd)", compute.attention),
        ("LM head (labelled tokens)", compute.lm_head),
        ("recompute (checkpointing)", compute.recompute),
    ):
        if n:
            print(f"  {label:<32}{n / 1e12:12.3f} TFLOP  {100 * n / compute.model_flops:5.1f}%")
    print(f"  {'per token':<32}{compute.per_token / 1e9:12.3f} GFLOP")
    print(
        f"  {acc.name}: {t.peak_tflops:g} TFLOP/s dense peak at MFU {mfu:.0%}: {t.seconds:.3f} s per optimizer step, "
        f"{t.tokens_per_second:,.0f} tokens/s over {s.gpus} GPU(s)"
    )
    print("\nPer-token FLOPs by sequence length (the O(L*T^2*d) attention term in numbers)")
    print(
        f"  {'T':>6}{'dense':>10}{'attention':>11}{'LM head':>10}{'total':>10}{'attn %':>8}{'x/token':>9}{'x/seq':>7}"
    )
    for r in seq_len_table(c, label_fraction=s.label_fraction):
        print(
            f"  {r['seq_len']:>6}{r['dense'] / 1e9:>10.3f}{r['attention'] / 1e9:>11.3f}{r['lm_head'] / 1e9:>10.3f}"
            f"{r['total'] / 1e9:>10.3f}{100 * r['attention_share']:>7.1f}%"
            f"{r.get('per_token_factor', 1):>9.3f}{r.get('per_sequence_factor', 1):>7.2f}"
        )
    print("  (GFLOP per token; x = factor over the previous T; a pure T^2 cost: 4x per sequence, 512 -> 1024)")
    if corrections(s):
        print("\nFigures often misquoted")
    for line in corrections(s):
        print(f"  - {line}")


def plan_json(s: PlanSetup, plan: MemoryPlan, acc, mfu: float) -> dict:
    from qatune.analysis.compute import plan_compute, seq_len_table, step_time
    from qatune.analysis.memory import GB, advice

    compute = plan_compute(s)
    t = step_time(s, acc, mfu)
    return {
        "model": s.name,
        "setup": {k: v for k, v in asdict(s).items() if k != "config"} | {"config": s.config.to_dict()},
        "state": asdict(plan.state),
        "device_bytes": plan.device,
        "host_bytes": plan.host,
        "activations": {
            "saved": plan.activations.saved,
            "per_block": plan.activations.per_block,
            "weight_copies": plan.activations.weight_copies,
            "loss_transient": plan.activations.loss_transient,
            "recompute": plan.activations.recompute,
        },
        "phases": plan.phases,
        "first_step_phases": plan.first_step_phases,
        "peak": plan.peak,
        "allowance": plan.allowance,
        "total_per_gpu": plan.total_with_allowance,
        "advice": advice(s, int(acc.memory_gb * GB), acc.name),
        "compute": {
            "dense": compute.dense,
            "attention": compute.attention,
            "lm_head": compute.lm_head,
            "recompute": compute.recompute,
            "per_token": compute.per_token,
            "attention_share": compute.attention_share,
        },
        "step_time": asdict(t),
        "seq_len_table": seq_len_table(s.config, label_fraction=s.label_fraction),
        "corrections": corrections(s),
        "notes": plan.notes,
    }


def _fmt(value, unit: str) -> str:
    from qatune.analysis.memory import GB

    if value is None:
        return "n/a"
    if unit == "bytes":
        return f"{value / GB:.4f} GB"
    if unit == "FLOP":
        return f"{value / 1e12:.4f} TFLOP"
    return f"{value:.2f} s"


def run_measure(args: argparse.Namespace, acc) -> int:
    """Plan for the device at hand, run one real step (a fresh process on CPU), compare."""
    import torch

    from qatune.analysis.measure import MEASURABLE_PRECISIONS, calibrate, compare, measure_in_subprocess, measure_step
    from qatune.analysis.memory import model_state, plan_memory
    from qatune.utils.device import DTYPES, default_device

    device = default_device(args.device)
    s = setup_from_args(args, device="cuda" if device.type == "cuda" else "cpu")
    if s.precision not in MEASURABLE_PRECISIONS:
        raise UserError(f"--measure: precision {s.precision} is not one qatune trains with (fp32, bf16, fp16)")
    m = measure_step(s) if device.type == "cuda" else measure_in_subprocess(s)
    rates = calibrate(
        device,
        DTYPES[s.precision],
        s.config.n_embd,
        min(s.tokens, 4096),
        min(model_state(s).trainable, 1 << 26),
    )
    rows = compare(s, m, rates)
    if args.json:
        print(
            json.dumps(
                {
                    "setup": plan_json(s, plan_memory(s), acc, args.mfu)["setup"],
                    "measurement": asdict(m),
                    "calibration": rates,
                    "comparison": rows,
                },
                indent=2,
            )
        )
        return 0
    print(f"{s.name}: one training step on {m.device} (torch {torch.__version__}); peak from {m.peak_source}")
    print(f"  {'component':<58}{'predicted':>18}{'measured':>18}{'ratio':>8}")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "n/a"
        print(f"  {r['name']:<58}{_fmt(r['predicted'], r['unit']):>18}{_fmt(r['measured'], r['unit']):>18}{ratio:>8}")
    print(
        f"  step-time estimate: FLOPs at this device's calibrated matmul rate "
        f"({rates['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s) + AdamW at its calibrated rate "
        f"({rates['adamw_params_per_s'] / 1e6:.0f}M params/s); optimizer step alone {m.optimizer_seconds:.2f} s"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from qatune.analysis.memory import plan_memory

    acc = get_accelerator(args.gpu)
    if args.measure:
        return run_measure(args, acc)
    s = setup_from_args(args)
    plan = plan_memory(s)
    if args.json:
        print(json.dumps(plan_json(s, plan, acc, args.mfu), indent=2))
    else:
        print_plan(s, plan, acc, args.mfu)
    return 0
