"""The `qatune` command: one subcommand per surface, each in its own module of this package.

A module registers itself with `add_parser(subparsers)` and runs through the `run(args)` it sets
as the parser's default `func`. Errors a user can fix (bad file, bad key) are printed as one line
and exit with status 2; anything else is a bug in qatune: its traceback is printed, and exit 1.
A subcommand module imports torch, transformers and the modules that need them inside `run`, so
that `qatune --help` and `qatune CMD --help` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from qatune import __version__
from qatune.errors import RunError, UserError

# Order is the order shown in --help: the pipeline, data -> plan -> train -> analyse -> use.
COMMANDS = [
    *("info", "export", "demo", "stats", "plan", "check", "train"),
    *("generate", "eval", "score", "chat", "serve", "grads"),
]

# A missing or unreadable file is the user's to fix: every path qatune opens is one the user named
# (a config, a data file, a model or run folder) or lies inside a folder they named, and Python's
# error names the file. Wrapping every open() in a UserError would say the same thing at each site.
FILE_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


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


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `key=value` overrides may also follow the options
    (`qatune train c.yaml --resume optim.lr=1e-4`), which argparse alone refuses: it fills the
    `overrides` positional before the first option and has nowhere to put the rest."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if extra and (overrides != extra or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"qatune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FILE_ERRORS as e:
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"qatune {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"qatune {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"qatune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            f"qatune {args.command}: internal error: this is a bug in qatune {__version__}, not in your input; "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return 1
