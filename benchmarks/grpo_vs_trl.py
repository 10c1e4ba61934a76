"""qatune's GRPO (`qatune train` with `method: grpo`) against TRL's GRPOTrainer, on this CPU.

The same work on both sides: the same starting weights (a small GPT-2 SFT-trained on the demo's
facts task for a while, saved once as a transformers folder and loaded by both), the same prompts
(the task's 240 training questions in the plain template), the same reward function (exact match
of the answer, SQuAD-normalized: `qatune.generation.metrics.exact_match`), the same group size,
prompts per step, max new tokens and sampling temperature, the same KL coefficient (beta) and ratio
clip, token-level loss normalization over the step (TRL's default `loss_type="dapo"`, qatune's),
group-std reward scaling, one optimizer step per generation batch, AdamW with the same betas, no
weight decay, constant learning rate, clipping at 1.0, fp32, the same thread count, a fixed number
of steps. Each side runs in its own subprocess (`harness.py`), so its peak RSS is its own.

Measured per step: wall time, split into generation (sampling, rewards, reference and old-policy
log-probs: TRL's `_generate_and_score_completions`, qatune's rollout collection) and training
(the rest: forward, backward, optimizer); the mean reward of the step's samples. After training,
both final models answer the 80 held-out questions greedily, scored by the same code.

    python -m benchmarks.grpo_vs_trl                      # 40 steps, 8 prompts x 8 samples
    python -m benchmarks.grpo_vs_trl --steps 10 --sides qatune
Needs the `bench` extra: pip install -e '.[bench]'  (trl).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import harness

SIDES = ("qatune", "trl")
SFT = {"steps": 110, "n_layer": 2, "n_embd": 128}  # the demo's recipe, stopped early: ~55% held-out EM


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for every side")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--workdir", default=None, help="keep data/models here (default: a temp folder)")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


# ---------------------------------------------------------------- shared preparation (parent)


def prepare(args, work: Path) -> None:
    """The starting model (SFT on the facts task, exported) and the prompts, written once."""
    from dataclasses import replace

    import torch

    from qatune.data.templates import get_template
    from qatune.demo.run import DemoSettings, encode, train_config
    from qatune.demo.task import make_task
    from qatune.launch import fit
    from qatune.train.runtime import make_model

    tok = harness.tokenizer()
    template = get_template("plain")
    train_qs, test_qs = make_task(args.seed)
    for name, qs in (("prompts", train_qs), ("heldout", test_qs)):
        with open(work / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for q in qs:
                row = {"question": q.question, "answer": q.answer, "prompt": template.render_prompt(q.question)}
                f.write(json.dumps(row) + "\n")
    settings = DemoSettings(out_dir=str(work), name="sft", steps=SFT["steps"], n_layer=SFT["n_layer"])
    cfg = replace(train_config(settings), precision="fp32", plots=False, tensorboard=False)
    torch.manual_seed(args.seed)
    model = make_model(cfg.model, len(tok))
    fit(model, tok, encode(train_qs, tok, template), cfg, template.to_dict(), progress=False)


def init_dir(work: Path) -> Path:
    return work / "sft" / "export"


# ---------------------------------------------------------------- the sides (children)


def heldout_exact_match(model, work: Path, max_new_tokens: int) -> float:
    """The same scorer for both sides: greedy answers to the held-out questions, exact match."""
    from qatune.generation.metrics import exact_match
    from qatune.generation.sampling import SamplingConfig, generate_ids

    tok = harness.tokenizer()
    rows = [json.loads(line) for line in (work / "heldout.jsonl").read_text().splitlines()]
    prompts = [tok(r["prompt"], add_special_tokens=False).input_ids for r in rows]
    gens = generate_ids(model, prompts, tok.eos_token_id, SamplingConfig(max_new_tokens=max_new_tokens))
    return sum(exact_match(tok.decode(g.ids), r["answer"]) for g, r in zip(gens, rows)) / len(rows)


def run_qatune(args, work: Path) -> dict:
    from qatune.config import from_dict
    from qatune.launch import train
    from qatune.methods.config import TrainConfig
    from qatune.model.hf_io import from_pretrained

    cfg = from_dict(
        TrainConfig,
        {
            "name": "qatune",
            "method": "grpo",
            "out_dir": str(work / "runs"),
            "model": {"name": str(init_dir(work))},
            "tokenizer": str(harness.SHARED / "tokenizer" / "gpt2"),
            "data": {"sources": [str(work / "prompts.jsonl")], "template": "plain", "max_len": 64},
            "batch": {"size": args.prompts * args.group},
            "optim": {
                "lr": args.lr,
                "lr_min": args.lr,
                "warmup_steps": 0,
                "betas": [0.9, 0.999],
                "weight_decay": 0.0,
                "grad_clip": 1.0,
            },
            **harness.run_settings(args.threads),
            "rl": {
                "reward": "exact_match",
                "prompts_per_rollout": args.prompts,
                "group_size": args.group,
                "generation_batch": args.prompts * args.group,
                "rollout": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature},
                "kl_coef": args.beta,
                "clip": args.epsilon,
            },
            "max_steps": args.steps,
            "precision": "fp32",
            "seed": args.seed,
        },
    )
    t0 = time.perf_counter()
    result = train(cfg, progress=False, overwrite=True)
    total = time.perf_counter() - t0
    h = result.history
    ends = [r["elapsed"] for r in h]  # seconds since the loop started, at the end of each step
    step_s = [b - a for a, b in zip([0.0, *ends[:-1]], ends)]
    generation = [r["collect_s"] for r in h]
    return {
        "total_s": total,
        "step_s": step_s,
        "generation_s": generation,
        "reward": [r["reward"] for r in h],
        "kl": [r["kl"] for r in h],
        "model": from_pretrained(result.export_dir),
    }


def run_trl(args, work: Path) -> dict:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from qatune.generation.metrics import exact_match
    from qatune.model.hf_io import from_pretrained

    tok, dataset = harness.library_side(work / "prompts.jsonl", padding_side=None)

    def reward(completions, answer, **kwargs):
        return [exact_match(c, a) for c, a in zip(completions, answer)]

    config = GRPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        epsilon=args.epsilon,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        **harness.library_settings(args.seed),
        bf16=False,
        logging_steps=1,
    )
    steps, generation = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.t0)

    trainer = GRPOTrainer(
        model=str(init_dir(work)), reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tok
    )
    real = trainer._generate_and_score_completions

    def timed(*a, **k):
        t = time.perf_counter()
        out = real(*a, **k)
        generation.append(time.perf_counter() - t)
        return out

    trainer._generate_and_score_completions = timed
    trainer.add_callback(Timer())
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    logs = [r for r in trainer.state.log_history if "reward" in r]
    trainer.model.save_pretrained(work / "trl" / "final")
    return {
        "total_s": total,
        "step_s": steps,
        "generation_s": generation,
        "reward": [r["reward"] for r in logs],
        "kl": [r.get("kl") for r in logs],
        "model": from_pretrained(work / "trl" / "final"),
    }


def child(args) -> None:
    work = Path(args.workdir)
    run = (lambda: run_qatune(args, work)) if args.side == "qatune" else (lambda: run_trl(args, work))

    def finish(stats: dict) -> None:
        stats["heldout_exact_match"] = heldout_exact_match(stats.pop("model"), work, args.max_new_tokens)

    harness.measure_side(run, "fp32", finish)


# ---------------------------------------------------------------- report (parent)


def child_argv(args) -> list[str]:
    keys = ("steps", "prompts", "group", "max_new_tokens", "temperature", "beta", "epsilon", "lr", "seed", "threads")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if harness.ran_child(args, child):
        return
    work = harness.workdir(args.workdir, "grpo_vs_trl")
    if not (init_dir(work) / "model.safetensors").exists():
        prepare(args, work)
    start_em = heldout_exact_match(_load(init_dir(work)), work, args.max_new_tokens)
    results = {}
    for side in args.sides:
        results[side] = harness.run_side(__file__, side, child_argv(args), work)
        print(f"  {side}: {results[side]['total_s']:.1f} s", file=sys.stderr, flush=True)
    tail = max(1, args.steps // 3)
    summary = {}
    for side, r in results.items():
        # the first step carries one-time costs (allocations, TRL's first generate); report the rest
        steady = slice(1, None) if len(r["step_s"]) > 1 else slice(None)
        step_s, gen_s = mean(r["step_s"][steady]), mean(r["generation_s"][steady])
        summary[side] = {
            "step_s": step_s,
            "generation_s": gen_s,
            "training_s": step_s - gen_s,
            "peak_rss_mb": r["peak_rss_mb"],
            "reward_first": mean(r["reward"][:tail]),
            "reward_last": mean(r["reward"][-tail:]),
            "reward_mean": mean(r["reward"]),
            "heldout_exact_match": r["heldout_exact_match"],
            "reward_curve": r["reward"],
            "total_s": r["total_s"],
            "cpu_s": r["cpu_s"],  # the child until training ends: imports, loading, 2-s matmul probe included
            "load_avg": r["load_avg"],
        }
    base, peer = summary.get("qatune"), summary.get("trl")
    if base and peer:
        base["speedup_step"] = peer["step_s"] / base["step_s"]
        base["speedup_generation"] = peer["generation_s"] / base["generation_s"]
        base["speedup_training"] = peer["training_s"] / base["training_s"]
        base["rss_ratio"] = base["peak_rss_mb"] / peer["peak_rss_mb"]
        base["cpu_ratio"] = peer["cpu_s"] / base["cpu_s"]
    print(
        f"\nGRPO, {args.steps} steps of {args.prompts} prompts x {args.group} samples, <= {args.max_new_tokens} new "
        f"tokens, T={args.temperature}, beta={args.beta}; GPT-2 L={SFT['n_layer']} d={SFT['n_embd']} (SFT start: "
        f"held-out EM {start_em:.3f}); fp32, torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(f"{'side':<8}{'s/step':>8}{'gen s':>8}{'train s':>9}{'CPU s':>8}{'peak RSS MB':>13}{'reward first':>14}"
          f"{'reward last':>13}{'reward mean':>13}{'held-out EM':>13}")  # fmt: skip
    for side, s in summary.items():
        print(
            f"{side:<8}{s['step_s']:>8.2f}{s['generation_s']:>8.2f}{s['training_s']:>9.2f}{s['cpu_s']:>8.0f}"
            f"{s['peak_rss_mb']:>13.0f}{s['reward_first']:>14.3f}{s['reward_last']:>13.3f}{s['reward_mean']:>13.3f}"
            f"{s['heldout_exact_match']:>13.3f}"
        )
    for side, s in summary.items():
        print(f"{side} reward per step: " + " ".join(f"{x:.2f}" for x in s["reward_curve"]))
    if base and peer:
        print(
            f"qatune vs TRL: {base['speedup_step']:.1f}x faster per step (generation "
            f"{base['speedup_generation']:.1f}x, training {base['speedup_training']:.1f}x), "
            f"{base['rss_ratio']:.2f}x the peak RSS, {base['cpu_ratio']:.1f}x less CPU time"
        )
    line = {"benchmark": "grpo_vs_trl", "args": vars(args) | {"workdir": str(work)}, "start_heldout_em": start_em}
    harness.emit(line | {"results": summary})


def _load(folder: Path):
    from qatune.model.hf_io import from_pretrained

    return from_pretrained(folder)


if __name__ == "__main__":
    main()
