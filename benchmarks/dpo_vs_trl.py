"""qatune's DPO and reward-model training against TRL's DPOTrainer and RewardTrainer, same work.

Same real pairs (a fixed seeded sample of ../shared/data/hh_rlhf_harmless whose responses both
have at least --min-response tokens and whose longer sequence fits max_len, so neither side
truncates), written once as explicit {prompt, chosen, rejected} JSONL: the prompt is the dialogue
up to and including its last "\\n\\nAssistant:", the responses keep their leading space, so both
sides tokenize exactly the same ids (qatune with the "raw" template; TRL splits prompt and
completion where their tokenizations diverge, which is the same place here). EOS after each
response on both sides. Same initial weights (a random GPT-2: 4 layers and d=256 by default,
GPT-2 small's or medium's shapes with `--size 124m` / `355m`; saved once: an LM for DPO, the same
backbone plus a score head for the reward model), loaded by both; same beta, lr, warmup + cosine
to lr_min, AdamW (betas 0.9/0.95, no weight decay), clipping 1.0, batch of pairs, one epoch, the
same thread count (1). Precision: `qatune-dpo`/`qatune-reward` in --precision (fp32 by default),
`qatune-dpo-default` in qatune's own default (`precision` unset: auto); TRL's sides in
--trl-precision (fp32 by default, the same as qatune's; TRL's own default is bf16). TRL's gradient
checkpointing (its default) is off, as qatune's: the same work. Each side runs in its own
subprocess (`harness.py`), so its peak RSS is its own.

Held-out reward accuracy is measured by the same code for every side (qatune's scorer on each
side's exported weights): DPO, the share of held-out pairs whose implicit reward
beta * (log pi/pi_ref) is higher for the chosen response (pi_ref = the initial weights), as TRL
defines reward accuracy; reward model, the share whose chosen response scores higher. The same is
reported on the training pairs (what the models memorised).

    python -m benchmarks.dpo_vs_trl                       # 96 pairs, all four sides (~13 min here)
    python -m benchmarks.dpo_vs_trl --sides qatune-dpo qatune-reward --data-seed 1   # qatune's spread
    python -m benchmarks.dpo_vs_trl --n-train 16 --sides qatune-dpo trl-dpo
    python -m benchmarks.dpo_vs_trl --size 124m --n-train 48 --precision bf16 --trl-precision bf16 \
        --sides qatune-dpo-default qatune-dpo trl-dpo
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

SIDES = ("qatune-dpo", "qatune-dpo-default", "trl-dpo", "qatune-reward", "trl-reward")
DEFAULT_SIDES = ("qatune-dpo", "trl-dpo", "qatune-reward", "trl-reward")
# --size: GPT-2 shapes (the tiny model's context is --max-len, as it always was)
SIZES = {
    "tiny": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    "124m": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
    "355m": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024},
}
ASSISTANT = "\n\nAssistant:"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="tiny", help="the model's shape (random init)")
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--n-heldout", type=int, default=400)
    p.add_argument("--min-response", type=int, default=32, help="tokens each response has at least")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lr-min", type=float, default=5e-5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-seed", type=int, default=None, help="qatune's shuffle seed (default --seed): the spread of its accuracy"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for every side")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="qatune's sides but -default")
    p.add_argument("--trl-precision", choices=["fp32", "bf16"], default="fp32", help="TRL's sides (its default: bf16)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(DEFAULT_SIDES))
    p.add_argument("--workdir", default=None, help="keep data/models here (default: a temp folder)")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


# ---------------------------------------------------------------- shared preparation (parent)


def split_dialogue(text: str) -> tuple[str, str]:
    cut = text.rfind(ASSISTANT) + len(ASSISTANT)
    return text[:cut], text[cut:]


def prepare(args, work: Path) -> dict:
    """Pick the pairs, write them as explicit JSONL, save the initial LM and reward model."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    tok = harness.tokenizer()
    eos = tok.eos_token_id
    usable = []
    for line in (harness.SHARED / "data" / "hh_rlhf_harmless" / "test.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        (prompt, chosen), (other, rejected) = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
        if prompt != other or not chosen.strip() or not rejected.strip() or chosen.strip() == rejected.strip():
            continue  # no shared prompt, an empty or identical response: not a usable pair
        n_prompt = len(tok(prompt)["input_ids"])
        n_c, n_r = (len(tok(r)["input_ids"]) + 1 for r in (chosen, rejected))  # + EOS
        if min(n_c, n_r) >= args.min_response and n_prompt + max(n_c, n_r) <= args.max_len:
            usable.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "tokens": [n_prompt, n_c, n_r]})
    rng = random.Random(args.seed)
    picked = rng.sample(usable, args.n_train + args.n_heldout)
    for name, rows in (("train", picked[: args.n_train]), ("heldout", picked[args.n_train :])):
        with open(work / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    torch.manual_seed(args.seed)
    hf = GPT2Config(
        vocab_size=len(tok),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **({"n_positions": args.max_len} | SIZES[args.size]),
    )
    GPT2LMHeadModel(hf).save_pretrained(work / "init")
    # The reward model starts from the same backbone, with one random score head saved for both.
    rm = GPT2ForSequenceClassification.from_pretrained(work / "init", num_labels=1, pad_token_id=eos)
    rm.save_pretrained(work / "init_rm")
    train = [r["tokens"] for r in picked[: args.n_train]]
    return {
        "usable": len(usable),
        "tokens": sum(p + c + p + r for p, c, r in train),  # both sequences of every pair
        "response_tokens": sum(c + r for _, c, r in train),
    }


# ---------------------------------------------------------------- scoring (children, same code for every side)


def load_pairs(path: Path, max_len: int):
    from qatune.data.pipeline import DataConfig
    from qatune.data.preference.pipeline import load_pairs as load

    loaded = load(
        DataConfig(sources=[str(path)], template="raw", max_len=max_len, truncation="error"), harness.tokenizer()
    )
    return loaded.pairs


def dpo_accuracy(policy_dir: Path, work: Path, args, name: str) -> float:
    """Share of pairs whose implicit reward is higher for chosen (pi_ref = the initial weights)."""
    from qatune.model.hf_io import from_pretrained

    policy, reference = from_pretrained(policy_dir).eval(), from_pretrained(work / "init").eval()
    wins = 0
    pairs = load_pairs(work / f"{name}.jsonl", args.max_len)
    for start in range(0, len(pairs), 16):
        chunk = pairs[start : start + 16]
        ratio = sequence_logps(policy, chunk, args) - sequence_logps(reference, chunk, args)
        wins += int((ratio[0::2] > ratio[1::2]).sum())  # beta > 0 does not change the order
    return wins / len(pairs)


def sequence_logps(model, pairs, args):
    import torch

    from qatune.data.batching import model_inputs
    from qatune.data.preference.batching import collate_pairs
    from qatune.methods.dpo.step import sequence_logps as logps

    batch = collate_pairs(pairs, list(range(len(pairs))), harness.tokenizer().eos_token_id, 2 * args.max_len)
    with torch.no_grad():
        return logps(model(**model_inputs(batch)), model.wte.weight, batch).double()


def reward_accuracy(rm_dir: Path, work: Path, args, name: str) -> float:
    from qatune.model.reward import load_reward_model

    rm = load_reward_model(rm_dir).eval()
    eos = harness.tokenizer().eos_token_id
    pairs = load_pairs(work / f"{name}.jsonl", args.max_len)
    chosen = rm.score_ids([p.prompt_ids + p.chosen_ids for p in pairs], eos)
    rejected = rm.score_ids([p.prompt_ids + p.rejected_ids for p in pairs], eos)
    return float((chosen > rejected).double().mean())


# ---------------------------------------------------------------- the sides (children)


def side_precision(args, side: str) -> str | None:
    """The precision a side is asked for; None: qatune's default."""
    if side == "qatune-dpo-default":
        return None
    return args.trl_precision if side.startswith("trl-") else args.precision


def qatune_config(args, work: Path, method: str) -> dict:
    precision = side_precision(args, args.side)
    return {
        "name": method,
        "method": method,
        "out_dir": str(work / "runs"),
        "model": {"name": str(work / ("init_rm" if method == "reward" else "init"))},
        "tokenizer": str(harness.SHARED / "tokenizer" / "gpt2"),  # the one TRL's side uses, not $QATUNE_TOKENIZER
        "data": {"sources": [str(work / "train.jsonl")], "template": "raw", "max_len": args.max_len},
        "batch": {"size": args.batch, "unit": "examples"},
        "optim": {"lr": args.lr, "lr_min": args.lr_min, "warmup_steps": args.warmup, "weight_decay": 0.0},
        **harness.run_settings(args.threads),
        "dpo": {"beta": args.beta},
        **({} if precision is None else {"precision": precision}),
        "seed": args.seed if args.data_seed is None else args.data_seed,  # the init is loaded: only the order
        "monitor": {"every": 0},
    }


def run_qatune(args, work: Path, method: str) -> dict:
    from qatune.config import from_dict
    from qatune.launch import train
    from qatune.methods.config import TrainConfig

    t_start, c_start = time.perf_counter(), time.process_time()
    cfg = from_dict(TrainConfig, qatune_config(args, work, method))
    result = train(cfg, progress=False, overwrite=True)  # a kept --workdir: rerun in place
    train_cpu_s = time.process_time() - c_start  # data loading and export included
    h = result.history
    saved = (result.run_dir / "config.yaml").read_text().splitlines()  # precision as the run resolved it
    return {
        "precision": next(x.split(":", 1)[1].strip() for x in saved if x.startswith("precision:")),
        "train_s": h[-1]["elapsed"],  # the runtime's own clock: data loading and export excluded
        "total_s": time.perf_counter() - t_start,
        "train_cpu_s": train_cpu_s,
        "steps": result.steps,
        "pairs": sum(r["examples"] for r in h),
        "final_train_loss": h[-1]["loss"],
        "export": str(result.export_dir),
    }


def trl_common(args, work: Path, side: str) -> dict:
    return {
        "output_dir": str(work / side),
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1,
        "learning_rate": args.lr,
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr": args.lr_min},
        "warmup_steps": args.warmup,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "max_length": args.max_len,
        "gradient_checkpointing": False,
        "bf16": args.trl_precision == "bf16",
        **harness.library_settings(args.seed),
        "logging_steps": 1,
    }


def run_trl(args, work: Path, side: str) -> dict:
    t_start = time.perf_counter()
    tok, dataset = harness.library_side(work / "train.jsonl")
    if side == "trl-dpo":
        from transformers import GPT2LMHeadModel
        from trl import DPOConfig, DPOTrainer

        model = GPT2LMHeadModel.from_pretrained(work / "init", attn_implementation="sdpa")
        ref = GPT2LMHeadModel.from_pretrained(work / "init", attn_implementation="sdpa")
        config = DPOConfig(**trl_common(args, work, side), beta=args.beta, loss_type=["sigmoid"])
        trainer = DPOTrainer(model=model, ref_model=ref, args=config, train_dataset=dataset, processing_class=tok)
    else:
        from transformers import GPT2ForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        model = GPT2ForSequenceClassification.from_pretrained(work / "init_rm", attn_implementation="sdpa")
        config = RewardConfig(**trl_common(args, work, side))
        trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)
    t0, c0 = time.perf_counter(), time.process_time()
    out = trainer.train()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    model.save_pretrained(work / side / "final")
    tok.save_pretrained(work / side / "final")
    return {
        "precision": args.trl_precision,
        "train_s": train_s,
        "total_s": time.perf_counter() - t_start,
        "train_cpu_s": train_cpu_s,
        "steps": out.global_step,
        "pairs": len(dataset),
        "final_train_loss": [r["loss"] for r in trainer.state.log_history if "loss" in r][-1],  # the last step's
        "export": str(work / side / "final"),
    }


def child(args) -> None:
    work = Path(args.workdir)
    method = "reward" if args.side.endswith("reward") else "dpo"
    side = lambda: run_qatune(args, work, method) if args.side.startswith("qatune") else run_trl(args, work, args.side)

    def score(stats: dict) -> None:
        accuracy = dpo_accuracy if method == "dpo" else reward_accuracy
        for name in ("heldout", "train"):
            stats[f"{name}_accuracy"] = accuracy(Path(stats["export"]), work, args, name)

    harness.measure_side(side, side_precision(args, args.side) or "fp32", finish=score)


# ---------------------------------------------------------------- report (parent)


def child_argv(args) -> list[str]:
    keys = ("size", "n_train", "n_heldout", "min_response", "max_len", "batch", "beta", "lr", "lr_min", "warmup")
    keys += ("seed", "precision", "trl_precision", "threads")
    argv = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    return argv + ([] if args.data_seed is None else ["--data-seed", str(args.data_seed)])


def compare(row: dict, r: dict, peer: dict, key: str) -> str:
    """TRL's side `r` against a qatune side: time, peak RSS, CPU time, held-out accuracy; the table's cells."""
    row[f"{key}_speedup"] = r["train_s"] / peer["train_s"]
    row[f"{key}_rss_ratio"] = peer["peak_rss_mb"] / r["peak_rss_mb"]
    # CPU seconds: robust to other processes on the cores; qatune's include its data loading and export
    row[f"{key}_cpu_speedup"] = r["train_cpu_s"] / peer["train_cpu_s"]
    row[f"{key}_accuracy_diff"] = peer["heldout_accuracy"] - r["heldout_accuracy"]
    diff = 100 * row[f"{key}_accuracy_diff"]
    return f"{row[f'{key}_speedup']:>8.1f}x{row[f'{key}_rss_ratio']:>7.2f}{diff:>+8.1f}p"


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if harness.ran_child(args, child):
        return
    work = harness.workdir(args.workdir, "dpo_vs_trl")
    t0 = time.perf_counter()
    info = prepare(args, work)
    peak, _ = harness.matmul_peak("fp32")
    results = {}
    for side in args.sides:
        results[side] = harness.run_side(__file__, side, child_argv(args), work)
        print(f"  {side}: {results[side]['train_s']:.1f} s", file=sys.stderr, flush=True)
    peak = max([peak] + [r["matmul_peak"] for side, r in results.items() if side_precision(args, side) == "fp32"])
    shape = SIZES[args.size]
    print(
        f"\n{args.n_train} HH-RLHF pairs (responses >= {args.min_response} tokens, <= {args.max_len} per sequence; "
        f"{info['tokens']:,} tokens, {info['response_tokens']:,} in responses), batch {args.batch} pairs, 1 epoch, "
        f"beta {args.beta}, lr {args.lr}; GPT-2 L={shape['n_layer']} d={shape['n_embd']} random init; "
        f"torch {torch.__version__}, {args.threads} thread(s); fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; "
        f"held-out {args.n_heldout} pairs"
    )
    header = f"{'side':<19}{'prec':>5}{'train s':>9}{'CPU s':>8}{'pairs/s':>9}{'peak RSS MB':>12}"
    header += f"{'held-out acc':>13}{'train acc':>10}"
    print(header + f"{'load':>6}{'speed-up':>9}{'RSS x':>7}{'acc diff':>9}   ([default]: against qatune-dpo-default)")
    summary = {}
    for side, r in results.items():
        row = {
            "precision": r["precision"],
            "train_s": r["train_s"],
            "pairs_per_s": r["pairs"] / r["train_s"],
            "steps": r["steps"],
            "peak_rss_mb": r["peak_rss_mb"],
            "heldout_accuracy": r["heldout_accuracy"],
            "train_accuracy": r["train_accuracy"],
            "final_train_loss": r["final_train_loss"],
            "train_cpu_s": r["train_cpu_s"],
            "cpu_s": r["cpu_s"],  # the whole child's CPU seconds before scoring: imports and setup included
            "load_avg": r["load_avg"],
        }
        ratios = ""
        if side.startswith("trl-"):
            mine = side.replace("trl-", "qatune-")
            for key, peer, tag in (("qatune", mine, ""), ("qatune_default", mine + "-default", " [default]")):
                if peer in results:
                    ratios += compare(row, r, results[peer], key) + tag
        summary[side] = row
        print(
            f"{side:<19}{row['precision']:>5}{row['train_s']:>9.1f}{row['train_cpu_s']:>8.1f}{row['pairs_per_s']:>9.2f}{row['peak_rss_mb']:>12.0f}"
            f"{row['heldout_accuracy']:>13.3f}{row['train_accuracy']:>10.3f}{r['load_avg'][1]:>6.1f}{ratios}"
        )
    line = {
        "bench": "dpo_vs_trl",
        "size": args.size,
        "precision": args.precision,
        "trl_precision": args.trl_precision,
        "n_train": args.n_train,
        "n_heldout": args.n_heldout,
        "min_response": args.min_response,
        "max_len": args.max_len,
        "batch": args.batch,
        "beta": args.beta,
        "lr": args.lr,
        "seed": args.seed,
        "data_seed": args.data_seed,
        "threads": args.threads,
        "torch": torch.__version__,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "script_s": round(time.perf_counter() - t0, 1),
        **info,
        "sides": summary,
    }
    harness.emit(line)


if __name__ == "__main__":
    main()
