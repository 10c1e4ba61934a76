"""`qatune train CONFIG.yaml [key=value …] [--resume | --overwrite]`: train into runs/<name>/ with the
config's method (supervised fine-tuning by default)."""

from __future__ import annotations

import argparse
import sys

from qatune.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune GPT-2 on Q&A data (response-only loss)", description=__doc__)
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. optim.lr=3e-5")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="clear a run folder that already holds a run, then train")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qatune.config import load_config
    from qatune.train.config import TrainConfig
    from qatune.train.distributed import run_training

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: continue the run, or replace it")
    result = run_training(cfg, resume=args.resume, progress=args.progress, overwrite=args.overwrite)
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    ev = result.final_eval
    summary = f"trained {result.steps} steps -> {result.run_dir}"
    if "eval_ppl" in ev:
        summary += f"; held-out response loss {ev['eval_loss']:.4f} (perplexity {ev['eval_ppl']:.2f})"
    elif "eval_loss" in ev:  # preference methods: the loss and their accuracy on held-out pairs
        accuracy = ev.get("eval_reward_accuracy", ev.get("eval_accuracy"))
        summary += f"; held-out loss {ev['eval_loss']:.4f}"
        summary += f", pair accuracy {accuracy:.3f}" if accuracy is not None else ""
    elif "eval_reward" in ev:  # RL methods: the reward of greedy answers, and how far the policy moved
        summary += f"; held-out reward {ev['eval_reward']:.4f}, KL to the start {ev['eval_kl']:.3f} nats/response"
    if result.export_dir:
        summary += f"; export: {result.export_dir}"
    print(summary, file=sys.stdout)
    return 0
