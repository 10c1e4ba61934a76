"""`qatune check CONFIG.yaml [key=value …]`: before a long run, check it in seconds on your own
config and data — the loss mask, packed = unpacked, accumulation invariance, a save/resume round
trip, the export in transformers, the chat template, truncation and the memory plan. Prints a
rendered example (loss tokens highlighted) and a PASS/WARN/FAIL table; exit status 1 when a check fails,
0 when every check passes, with or without warnings."""

from __future__ import annotations

import argparse
import sys

from qatune.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="check a training config on your data before a long run", description=__doc__)
    p.add_argument("config", help="YAML config (as for qatune train)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. data.max_len=512")
    p.add_argument("--sample", type=int, default=64, help="records of the data to check on (default 64)")
    p.add_argument("--keep", metavar="DIR", help="keep the round trip's run folders here (default: a temp folder)")
    p.set_defaults(func=run)


STYLES = {"PASS": "[green]PASS[/]", "WARN": "[bold yellow]WARN[/]", "FAIL": "[bold red]FAIL[/]"}


def print_example(console, report) -> None:
    from rich.text import Text

    text = Text()
    for span, in_loss, _ in report.example:
        text.append(span, style="bold green underline" if in_loss else "dim")
    console.print(f"example ({report.example_where}); [bold green underline]loss tokens[/] highlighted:")
    console.print(text)
    tokens = sum(n for _, _, n in report.example)
    in_loss = sum(n for _, loss, n in report.example if loss)
    loss = "".join(span for span, loss, _ in report.example if loss)
    console.print(f"{tokens} tokens, {in_loss} in the loss: {loss!r}\n", highlight=False)


def print_table(console, report) -> None:
    from rich.table import Table

    table = Table(title="qatune check")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for r in report.results:
        table.add_row(r.name, STYLES[r.status], r.detail)
    console.print(table)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qatune.check import run_checks
    from qatune.config import load_config
    from qatune.methods.config import TrainConfig

    if args.sample < 2:
        raise UserError(f"--sample must be at least 2, got {args.sample}")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    report = run_checks(cfg, args.sample, args.keep)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if report.example:
        print_example(console, report)
    print_table(console, report)
    for note in report.notes:
        print(note, file=sys.stderr)
    failed = [r for r in report.results if not r.ok]
    warned = [r for r in report.results if r.ok and r.warn]
    for r in warned + failed:  # unwrapped, to copy or grep
        print(f"{r.status} {r.name}: {r.detail}")
    warnings = f" ({len(warned)} with a warning: {', '.join(r.name for r in warned)})" if warned else ""
    passed = f"all {len(report.results)} checks passed{warnings}"
    print(f"failed: {', '.join(r.name for r in failed)}" if failed else passed)
    # A warning passes (exit 0): the run is correct, only not on all of the data as given.
    return 1 if failed else 0
