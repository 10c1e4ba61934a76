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
    from qatune.launch import run_training
    from qatune.methods import method_class
    from qatune.methods.config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: continue the run, or replace it")
    result = run_training(cfg, resume=args.resume, progress=args.progress, overwrite=args.overwrite)
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    summary = f"trained {result.steps} steps -> {result.run_dir}"
    held_out = held_out_summary(method_class(cfg.method), result.final_eval)
    summary += f"; {held_out}" if held_out else ""
    if result.export_dir:
        summary += f"; export: {result.export_dir}"
    print(summary, file=sys.stdout)
    return 0


def held_out_summary(method, final_eval: dict) -> str:
    """The held-out metrics among the method's declared `summary_fields`, as "what it is value"."""
    shown = [(key, text) for key, text in method.summary_fields if key.startswith("eval_") and key in final_eval]
    return ", ".join(f"{text} {final_eval[key]:.4f}" for key, text in shown)
