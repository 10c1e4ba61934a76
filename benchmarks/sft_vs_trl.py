"""qatune's training loop against TRL's SFTTrainer on the same work, on this machine's CPU.

Same model (`--size`: a tiny GPT-2 of 4 layers and d=256 by default; GPT-2 small's or medium's
shapes, `124m` / `355m`; SmolLM2-135M's Llama shapes, `smollm2-135m`; random initial weights
saved once by transformers and loaded by both: GPT2LMHeadModel / LlamaForCausalLM),
same fixed sample of real t0 Q&A examples (../shared/data/t0_qa_subset, only examples whose
prompt + answer + EOS fit in max_len, so neither side truncates), one epoch, the same batch of 8
examples per optimizer step (TRL with packing: 8 packed rows per step, its own batching), the
same AdamW (no weight decay on either side, so no disagreement about which tensors decay), the
same warmup + cosine to lr_min, clipping at 1.0, the same precision. Loss on the answer only
(TRL: completion_only_loss). Each side runs in its own subprocess, so its peak RSS is its own.
Both trained models are scored by the same code: qatune's held-out response-token loss.

Sides: `qatune` trains in --precision, `qatune-default` in qatune's own default (`precision`
unset: auto); TRL's sides run in --precision (bf16 by default, TRL's own default): `trl-default`
pads each batch, `trl-packing` packs (TRL's bfd packing, which is padding-free),
`trl-padding-free` flattens each batch unpacked, `trl-chunked` pads with its chunked loss.

SmolLM2's tokenizer (49,152 tokens) is not at hand without the hub, so `smollm2-135m` tokenizes
with GPT-2's BPE cut to the same size: its first 49,151 tokens (bytes, then merges in the order
learned) and the merges among them, `<|endoftext|>` as id 49,151 (`trimmed_tokenizer`). The
embedding and head are then SmolLM2's size, and the text costs about as many tokens as English
does in a BPE of that size.

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

    python -m benchmarks.sft_vs_trl                     # tiny GPT-2, 1,000 examples, four sides
    python -m benchmarks.sft_vs_trl --n-train 200 --sides qatune trl-default
    python -m benchmarks.sft_vs_trl --size 124m --n-train 96 --no-phases \
        --sides qatune-default qatune trl-default trl-packing trl-padding-free
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

SIDES = ("qatune", "qatune-default", "trl-default", "trl-packing", "trl-padding-free", "trl-chunked")
DEFAULT_SIDES = ("qatune", "trl-default", "trl-packing", "trl-chunked")
# --size: the family and the shape (the tiny model's context is --max-len, as it always was)
SIZES = {
    "tiny": ("gpt2", {"n_layer": 4, "n_embd": 256, "n_head": 4}),
    "124m": ("gpt2", {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}),
    "355m": ("gpt2", {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024}),
    "smollm2-135m": ("llama", "smollm2-135m"),  # qatune.model.llama.SIZES
}
SMOLLM2_VOCAB = 49152


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="tiny", help="the model's shape (random init)")
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
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(DEFAULT_SIDES))
    p.add_argument(
        "--phases", action=argparse.BooleanOptionalAction, default=True, help="train qatune once more, timed by phase"
    )
    p.add_argument("--op-profile", type=int, default=0, metavar="N", help="also print torch.profiler's N costliest ops")
    p.add_argument("--workdir", default=None, help="keep data/models here (default: a temp folder)")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


# ---------------------------------------------------------------- shared preparation (parent)


def trimmed_tokenizer(size: int, out: Path):
    """GPT-2's byte-level BPE cut to `size` tokens (see the module's docstring), saved in `out`."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from qatune.data.example import EOS_TEXT

    gpt2 = json.loads((harness.SHARED / "tokenizer" / "gpt2" / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {t: i for t, i in gpt2["model"]["vocab"].items() if i < size - 1}
    merges = [m if isinstance(m, str) else " ".join(m) for m in gpt2["model"]["merges"]]
    merges = [m for m in merges if all(part in vocab for part in m.split(" ")) and m.replace(" ", "") in vocab]
    bpe = Tokenizer(BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([EOS_TEXT])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TEXT, bos_token=EOS_TEXT, unk_token=EOS_TEXT)
    assert len(tok) == size and tok.eos_token_id == size - 1, (len(tok), tok.eos_token_id)
    tok.save_pretrained(str(out))


def tokenizer(args, work: Path):
    """The tokenizer every side uses: GPT-2's, or for smollm2-135m the trimmed one `prepare` saved."""
    if args.size == "smollm2-135m":
        from qatune.model.tokenizer import load_tokenizer

        return load_tokenizer(work / "tokenizer")
    return harness.tokenizer()


def save_init(args, work: Path, tok) -> None:
    """The random initial weights, written by transformers once, loaded by every side."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    family, shape = SIZES[args.size]
    if family == "gpt2":
        hf = GPT2Config(
            vocab_size=len(tok),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            **({"n_positions": args.max_len} | shape),
        )
        GPT2LMHeadModel(hf).save_pretrained(work / "init")
        return
    from dataclasses import replace

    from qatune.model.llama import SIZES as LLAMA_SIZES
    from qatune.model.llama_hf_io import config_to_hf

    eos = tok.eos_token_id
    config = replace(LLAMA_SIZES[shape], vocab_size=len(tok), bos_token_id=eos, eos_token_id=eos)
    LlamaForCausalLM(LlamaConfig(**config_to_hf(config))).save_pretrained(work / "init")


def model_shape(work: Path) -> dict:
    """What the FLOP count reads, from the saved initial model's config.json: layers, width,
    vocabulary, the matmul weights of one block, those of its key/value projections, and the
    attention's inner width (heads x head_dim)."""
    hf = json.loads((work / "init" / "config.json").read_text())
    if hf["model_type"] == "gpt2":
        d = hf["n_embd"]
        return {"L": hf["n_layer"], "d": d, "vocab": hf["vocab_size"], "block": 12 * d * d, "kv": 2 * d * d, "width": d}
    d, hd, heads, kv_heads = hf["hidden_size"], hf["head_dim"], hf["num_attention_heads"], hf["num_key_value_heads"]
    block = d * hd * (2 * heads + 2 * kv_heads) + 3 * d * hf["intermediate_size"]  # q, o, k, v; SwiGLU's three
    return {
        "L": hf["num_hidden_layers"],
        "d": d,
        "vocab": hf["vocab_size"],
        "block": block,
        "kv": 2 * d * hd * kv_heads,
        "width": heads * hd,
    }


def prepare(args, work: Path) -> dict:
    """Pick the examples, write them as prompt/completion JSONL, save the initial model."""
    from qatune.data.encode import encode_records
    from qatune.data.readers import read_records
    from qatune.data.templates import get_template

    if args.size == "smollm2-135m":
        trimmed_tokenizer(SMOLLM2_VOCAB, work / "tokenizer")
    tok = tokenizer(args, work)
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
    save_init(args, work, tok)
    train_enc = [encodings[i] for i in chosen[: args.n_train]]
    return {
        "examples": len(train_enc),
        "lengths": [len(e) for e in train_enc],
        "labels": [e.n_label_tokens for e in train_enc],
    }


def forward_flops(lengths: list[int], labels: list[int], shape: dict) -> dict[str, float]:
    """Forward FLOPs the work needs, real tokens only, by part; training is 3x (forward + backward).
    `shape`: `model_shape` (GPT-2: a block's matmuls are 12 d^2 weights, 2 d^2 of them k and v)."""
    L, block, kv, width = shape["L"], shape["block"], shape["kv"], shape["width"]
    parts = {"blocks": 0.0, "attention": 0.0, "head": 0.0}
    for T, n_lab in zip(lengths, labels):
        # the blocks' matmuls; the last block's output is read only where a label is, so
        # elsewhere it needs only the keys and values
        parts["blocks"] += 2 * (block * L * T - (block - kv) * (T - n_lab))
        # QK^T and AV over each query's causal prefix; in the last block only the label rows'
        # queries (the answer's rows T-n_lab-1 .. T-2 read T-n_lab .. T-1 keys)
        parts["attention"] += 2 * 2 * width * ((L - 1) * T * (T + 1) / 2 + n_lab * (2 * T - n_lab - 1) / 2)
        parts["head"] += 2 * shape["d"] * shape["vocab"] * n_lab  # LM head only where a label is
    return parts


def work_flops(lengths: list[int], labels: list[int], shape: dict) -> float:
    """Training FLOPs the work needs: 3x the forward (forward + backward), real tokens only."""
    return 3 * sum(forward_flops(lengths, labels, shape).values())


def phase_flops(lengths: list[int], labels: list[int], shape: dict) -> dict[str, float]:
    """The same FLOPs by phase of qatune's step: the loss phase runs the head's forward and both
    of its gradient matmuls (they are formed in the forward pass)."""
    f = forward_flops(lengths, labels, shape)
    body = f["blocks"] + f["attention"]
    return {"forward": body, "loss": 3 * f["head"], "backward": 2 * body}


# ---------------------------------------------------------------- the sides (children)


def heldout_loss(model, work: Path, max_len: int, tok) -> float:
    """The same scorer for every side: qatune's response-token loss on the held-out examples, fp32."""
    import torch

    from qatune.data.pipeline import DataConfig, load_examples
    from qatune.data.plan import eval_batches
    from qatune.methods.sft.step import evaluate
    from qatune.train.step import Precision

    ex = load_examples(DataConfig(sources=[str(work / "heldout.jsonl")], template="raw", max_len=max_len), tok)
    batches = eval_batches(ex.examples, "grouped", max_len, tok.pad_token_id, 8)
    return evaluate(model, batches, Precision("fp32", torch.device("cpu")))["eval_loss"]


def run_qatune(args, work: Path, name: str = "qatune", max_steps: int | None = None, overrides=None) -> dict:
    """qatune on the work; `args.side` "qatune-default" leaves `precision` to qatune's default."""
    from qatune.config import from_dict
    from qatune.data.pipeline import DataConfig, load_examples
    from qatune.launch import fit
    from qatune.methods.config import TrainConfig
    from qatune.model.families import from_pretrained

    t_start = time.perf_counter()
    tok = tokenizer(args, work)
    data = DataConfig(sources=[str(work / "train.jsonl")], template="raw", max_len=args.max_len)
    examples = load_examples(data, tok).examples
    model = from_pretrained(work / "init")
    precision = {} if args.side == "qatune-default" else {"precision": args.precision}
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
            **precision,
            "seed": args.seed,
        }
        | (overrides or {}),
    )
    t0, c0 = time.perf_counter(), time.process_time()
    result = fit(model, tok, examples, cfg, progress=False, overwrite=True)  # a kept --workdir: rerun in place
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    h = result.history
    saved = (result.run_dir / "config.yaml").read_text().splitlines()  # precision as the run resolved it
    return {
        "precision": next(x.split(":", 1)[1].strip() for x in saved if x.startswith("precision:")),
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
    from qatune.model.families import from_pretrained

    data = DataConfig(sources=[str(work / "train.jsonl")], template="raw", max_len=args.max_len)
    examples = load_examples(data, tokenizer(args, work)).examples
    size = args.batch
    batches = [make_batch(examples[i : i + size], "packed", args.max_len, 0) for i in range(0, len(examples), size)]
    return from_pretrained(work / "init"), [b.to("cpu") for b in batches]  # .to(): builds the label index


def run_trl(args, work: Path, side: str) -> dict:
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from qatune.model.families import from_pretrained

    t_start = time.perf_counter()
    tok, dataset = harness.library_side(work / "train.jsonl", tokenizer=tokenizer(args, work))
    model = AutoModelForCausalLM.from_pretrained(work / "init", attn_implementation="sdpa")
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
        # unpacked padding-free does not truncate and refuses a max_length; every example fits anyway
        max_length=None if side == "trl-padding-free" else args.max_len,
        packing=side == "trl-packing",
        padding_free=side == "trl-padding-free",
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
        "precision": args.precision,
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
    qatune = args.side.startswith("qatune")
    side = lambda: run_qatune(args, work) if qatune else run_trl(args, work, args.side)

    def score(stats: dict) -> None:
        stats["heldout_loss"] = heldout_loss(stats.pop("model"), work, args.max_len, tokenizer(args, work))
        # after the peak RSS was read: the profiler's records are not training's
        if args.side == "qatune" and args.phases:
            phases = profile_phases(args, work)
            if phases is not None:
                stats["phases"] = phases

    # qatune's default precision is known once it ran; the matmul peak is measured before, in the
    # precision it picks on a CPU today (fp32), and again in the parent for whatever it picked
    harness.measure_side(side, "fp32" if args.side == "qatune-default" else args.precision, finish=score)


# ---------------------------------------------------------------- report (parent)


def child_argv(args) -> list[str]:
    keys = ("size", "n_train", "n_heldout", "max_len", "batch", "lr", "lr_min", "warmup", "precision", "seed")
    keys += ("threads", "op_profile")
    argv = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    return argv + ([] if args.phases else ["--no-phases"])


def run_one(side: str, args, work: Path) -> dict:
    return harness.run_side(__file__, side, child_argv(args), work)


def info_work(info: dict, work: Path) -> tuple[list[int], list[int], dict]:
    return info["lengths"], info["labels"], model_shape(work)


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


def describe(work: Path) -> str:
    hf = json.loads((work / "init" / "config.json").read_text())
    if hf["model_type"] == "gpt2":
        return f"GPT-2 L={hf['n_layer']} d={hf['n_embd']} heads={hf['n_head']} vocab={hf['vocab_size']}"
    return (
        f"Llama L={hf['num_hidden_layers']} d={hf['hidden_size']} heads={hf['num_attention_heads']}/"
        f"{hf['num_key_value_heads']} kv d_ff={hf['intermediate_size']} vocab={hf['vocab_size']}"
    )


def peaks(parent: dict, results: dict) -> dict[str, tuple[float, float]]:
    """The machine's matmul throughput per precision (per wall second, per CPU second): the best of
    this process's measurements and the sides' own (others may share the cores)."""
    out = dict(parent)
    for r in results.values():
        wall, cpu = out.get(r["peak_precision"], (0.0, 0.0))
        out[r["peak_precision"]] = (max(wall, r["matmul_peak"]), max(cpu, r["matmul_peak_cpu"]))
    for precision in {r["precision"] for r in results.values()} - set(out):
        out[precision] = harness.matmul_peak(precision)
    return out


def compare(row: dict, r: dict, base: dict | None, key: str) -> None:
    """TRL's side against a qatune side: time (speed-up), peak RSS and held-out loss ratios."""
    if base is not None:
        row[f"{key}_speedup"] = r["train_s"] / base["train_s"]
        row[f"{key}_rss_ratio"] = base["peak_rss_mb"] / r["peak_rss_mb"]
        row[f"{key}_loss_ratio"] = base["heldout_loss"] / r["heldout_loss"]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    if harness.ran_child(args, child):
        return

    work = harness.workdir(args.workdir, "sft_vs_trl")
    info = prepare(args, work)
    shape = model_shape(work)
    flops = work_flops(info["lengths"], info["labels"], shape)
    parent_peak = {args.precision: harness.matmul_peak(args.precision)}
    results = {}
    for side in args.sides:
        results[side] = run_one(side, args, work)
        print(f"  {side}: {results[side]['train_s']:.1f} s", file=sys.stderr, flush=True)
    # A side's matmul peak was measured in the precision it was asked for; qatune-default's in fp32
    for side, r in results.items():
        r["peak_precision"] = "fp32" if side == "qatune-default" else args.precision
    best = peaks(parent_peak, results)
    base, base_default = results.get("qatune"), results.get("qatune-default")
    header = f"{'side':<17}{'prec':>5}{'train s':>9}{'ex/s':>7}{'tok/s':>8}{'label tok/s':>12}{'peak RSS MB':>12}"
    header += f"{'held-out loss':>14}{'MFU':>7}{'CPU MFU':>8}{'load':>6}{'speed-up':>9}{'RSS x':>7}{'loss x':>8}"
    peak_text = "; ".join(f"{p} {w / 1e9:.0f} wall, {c / 1e9:.0f} CPU" for p, (w, c) in best.items())
    print(
        f"\n{args.n_train} t0 examples (<= {args.max_len} tokens), batch {args.batch}, 1 epoch, --precision "
        f"{args.precision}, {describe(work)} random init; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; matmul peak GFLOP/s (best measured): {peak_text}"
    )
    print(header + "   (speed-up, RSS x, loss x: against qatune; [default] against qatune-default)")
    summary = {}
    for side, r in results.items():
        if r["tokens"] is None:
            r["tokens"], r["label_tokens"] = sum(info["lengths"]), sum(info["labels"])
        peak, peak_cpu = best[r["precision"]]
        mfu, mfu_cpu = flops / r["train_s"] / peak, flops / r["train_cpu_s"] / peak_cpu
        row = {
            "precision": r["precision"],
            "train_s": r["train_s"],
            "total_s": r["total_s"],
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
        if side.startswith("trl"):
            compare(row, r, base, "qatune")
            compare(row, r, base_default, "qatune_default")
        summary[side] = row
        line = (
            f"{side:<17}{row['precision']:>5}{row['train_s']:>9.1f}{row['examples_per_s']:>7.2f}"
            f"{row['tokens_per_s']:>8.0f}{row['label_tokens_per_s']:>12.0f}{row['peak_rss_mb']:>12.0f}"
            f"{row['heldout_loss']:>14.4f}{100 * mfu:>6.1f}%{100 * mfu_cpu:>7.1f}%{max(r['load_avg']):>6.1f}"
        )
        for key, tag in (("qatune", ""), ("qatune_default", " [default]")):
            if f"{key}_speedup" in row:
                line += (
                    f"{row[f'{key}_speedup']:>8.1f}x{row[f'{key}_rss_ratio']:>7.2f}"
                    f"{row[f'{key}_loss_ratio']:>8.3f}{tag}"
                )
        print(line)
    if base and "phases" in base:
        peak, peak_cpu = best[base["precision"]]
        summary["qatune"]["phases"] = print_phases(base["phases"], phase_flops(*info_work(info, work)), peak, peak_cpu)
    record = {"benchmark": "sft_vs_trl", "args": vars(args) | {"workdir": str(work)}, "model": describe(work)}
    harness.emit(record | {"results": summary})


if __name__ == "__main__":
    main()
