"""Options and loaders shared by several subcommands."""

from __future__ import annotations

import argparse

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


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name_or_path: str, device: torch.device) -> GPT2:
    return from_pretrained(name_or_path).to(device)


def load_tokenizer_for(model_path: str, explicit: str | None):
    """--tokenizer if given, else the tokenizer saved beside the model, else the setting/default."""
    from pathlib import Path

    from qatune.model.tokenizer import load_tokenizer

    if explicit is None and Path(model_path).is_dir():
        folder = Path(model_path)
        if (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists():
            return load_tokenizer(folder)
    return load_tokenizer(explicit)
