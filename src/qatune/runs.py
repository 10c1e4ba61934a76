"""Run folders as a reader sees them: where a run's model is, what it was trained with.

    path = resolve_model_path("runs/large-v1")    # -> "runs/large-v1/export"
    meta = read_meta(path)                         # template, max_len … (None for plain models)
    model = load_model("runs/large-v1", torch.device("cuda"))

A run folder (`<out_dir>/<name>/`) holds config.yaml, metrics.jsonl, checkpoints/ and, at the end,
export/ — a transformers folder of the model's family (GPT-2, Llama, Qwen2 …) with qatune.json
beside the weights. Anything that is not a run folder (a model folder, a hub name) is used as it
is. The CLI, a server and a notebook all read runs through this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qatune.model import families
from qatune.model.attention import DecoderLM
from qatune.model.hf_io import CheckpointError
from qatune.utils.hub import looks_like_local_path

EXPORT_DIR = "export"  # a run folder's final Hugging Face export
ADAPTER_DIR = "adapter"  # a LoRA run's adapter in peft's format (export/ holds the merged model)
CHECKPOINTS_DIR = "checkpoints"
META_FILE = "qatune.json"  # beside an export: the template and max_len the model was trained with


def resolve_model_path(model_or_run: str) -> str:
    """A run folder means its final export; anything else (folder, hub name) is used as is. A
    local-looking path that does not exist is an error here, before any tokenizer or hub lookup."""
    run_export = Path(model_or_run) / EXPORT_DIR
    if (run_export / "config.json").exists():
        return str(run_export)
    if not Path(model_or_run).exists() and looks_like_local_path(model_or_run):
        raise CheckpointError(f"{model_or_run}: no such folder")
    return model_or_run


def read_meta(model_path: str) -> dict | None:
    """The qatune.json written beside an export (template, max_len …), or None for plain models."""
    f = Path(model_path) / META_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else None


def load_model(name_or_path: str, device: torch.device) -> DecoderLM:
    """The model of a run (its export), an exported folder or a hub name, of its own family."""
    return families.from_pretrained(resolve_model_path(name_or_path)).to(device)


def load_tokenizer_for(model_path: str, explicit: str | None):
    """`explicit` if given, else the tokenizer saved beside the model, else the setting/default."""
    from qatune.model.tokenizer import load_tokenizer

    model_path = resolve_model_path(model_path)
    if explicit is None and Path(model_path).is_dir():
        folder = Path(model_path)
        if (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists():
            return load_tokenizer(folder)
    return load_tokenizer(explicit)
