"""The `qatune` command: one subcommand per surface, each in its own module of this package.

A module registers itself with `add_parser(subparsers)` and runs through the `run(args)` it sets
as the parser's default `func`. Errors a user can fix (bad file, bad key) are printed as one line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qatune import __version__
from qatune.errors import RunError

# Order is the order shown in --help: the pipeline, data -> plan -> train -> analyse -> use.
COMMANDS = [
    *("info", "export", "demo", "stats", "plan", "check", "train"),
    *("generate", "eval", "score", "chat", "serve", "grads"),
]

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatune",
        description="Instruction-tune GPT-2 on question-answer data, and understand the run.",
    )
    parser.add_argument("--version", action="version", version=f"qatune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"qatune.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except USER_ERRORS as e:
        print(f"qatune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"qatune {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"qatune {args.command}: interrupted", file=sys.stderr)
        return 130
