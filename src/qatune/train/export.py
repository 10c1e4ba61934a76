"""The end of a run: gather the weights (FSDP), write the Hugging Face folder and qatune.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from qatune.model.checkpoint import export_hf
from qatune.runs import EXPORT_DIR, META_FILE
from qatune.train.dist_checkpoint import full_state_dict
from qatune.train.step import backbone


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def meta_text(info: dict) -> str:
    return json.dumps(info, indent=2, default=_json_default) + "\n"


def export_lm(model, run, info: dict) -> Path:
    """`<run>/export`: the GPT-2 as a transformers GPT2LMHeadModel folder, tokenizer, qatune.json."""
    target = run.run_dir / EXPORT_DIR
    return export_hf(backbone(model), target, run.tokenizer, extra_files={META_FILE: meta_text(info)})


def gathered(model, rank: int, rebuild):
    """Collective under FSDP: the full weights on rank 0, as a plain module built by `rebuild()`
    on the meta device (no memory until the gathered tensors are assigned); None on other ranks."""
    full = full_state_dict(model)
    if rank != 0:
        return None
    with torch.device("meta"):
        plain = rebuild()
    plain.load_state_dict(full, assign=True)
    return plain
