"""Options and loaders shared by several subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qatune.model.checkpoint import from_pretrained
from qatune.model.gpt2 import GPT2
from qatune.model.tokenizer import ENV_VAR


def add_tokenizer_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        default=None,
        help=f"hub name, folder, or vocab.json path (default: ${ENV_VAR}, else the model's own, else 'gpt2')",
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
            raise ValueError(f"--mapping {item!r}: expected ROLE=FIELD, e.g. prompt=question")
        mapping[role] = field
    return mapping or None


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


RUN_EXPORT = "export"  # a run folder's final Hugging Face export
META_FILE = "qatune.json"  # beside an export: the template and max_len the model was trained with


def resolve_model_path(model_or_run: str) -> str:
    """A run folder means its final export; anything else (folder, hub name) is used as is."""
    run_export = Path(model_or_run) / RUN_EXPORT
    return str(run_export) if (run_export / "config.json").exists() else model_or_run


def read_meta(model_path: str) -> dict | None:
    """The qatune.json written beside an export (template, max_len …), or None for plain models."""
    f = Path(model_path) / META_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else None


def load_model(name_or_path: str, device: torch.device) -> GPT2:
    return from_pretrained(resolve_model_path(name_or_path)).to(device)


def load_tokenizer_for(model_path: str, explicit: str | None):
    """--tokenizer if given, else the tokenizer saved beside the model, else the setting/default."""
    from qatune.model.tokenizer import load_tokenizer

    model_path = resolve_model_path(model_path)
    if explicit is None and Path(model_path).is_dir():
        folder = Path(model_path)
        if (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists():
            return load_tokenizer(folder)
    return load_tokenizer(explicit)
