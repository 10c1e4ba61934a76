"""`qatune demo`: the first command to run. Offline: trains a small GPT-2 from scratch on a Q&A task
the project generates (country facts), prints held-out exact match before and after, answers a few
questions, and writes a run folder with plots and an export."""

from __future__ import annotations

import argparse
import dataclasses


def add_parser(sub) -> None:
    from qatune.demo.settings import DemoSettings

    d = DemoSettings()
    p = sub.add_parser("demo", help="offline demo: train a tiny GPT-2 on generated Q&A in about a minute")
    p.description = __doc__
    p.add_argument("--out-dir", default=d.out_dir, help="the run folder goes in here (default: runs)")
    p.add_argument("--name", default=None, help="run folder name (default: demo, or demo-quick)")
    p.add_argument("--quick", action="store_true", help="a shorter run (fewer steps, smaller model) for CI")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tokenizer", default=None, help="GPT-2 tokenizer folder, or 'builtin' to train a small BPE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qatune.demo.run import run_demo
    from qatune.demo.settings import QUICK, DemoSettings

    s = DemoSettings(out_dir=args.out_dir, seed=args.seed, tokenizer=args.tokenizer)
    if args.quick:
        s = dataclasses.replace(s, **QUICK)
    if args.name:
        s.name = args.name
    if args.steps:
        s.steps = args.steps
    run_demo(s)
    return 0
