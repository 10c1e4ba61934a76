"""The end of a run: gather the weights (FSDP), write the Hugging Face folder, qatune.json and the
model card (README.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from qatune.model.checkpoint import export_hf
from qatune.model.lora import has_lora, merge_lora, save_adapter
from qatune.runs import ADAPTER_DIR, EXPORT_DIR, META_FILE
from qatune.train.dist_checkpoint import full_state_dict
from qatune.train.model_card import CARD_FILE, final_metrics, model_card
from qatune.train.step import backbone


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def meta_text(info: dict) -> str:
    return json.dumps(info, indent=2, default=_json_default) + "\n"


def export_files(run, info: dict, method) -> dict[str, str]:
    """The files written beside an export's weights (in the same atomic write): qatune.json, and
    the model card from the run's resolved config, `info` and the final metrics in metrics.jsonl.
    method: the Method (class or instance) whose fields, title and config sections the card shows."""
    metrics = final_metrics(run.run_dir, info.get("steps"))
    card = model_card(run.cfg, info, metrics, method.summary_fields, method.title, method.config_sections)
    return {META_FILE: meta_text(info), CARD_FILE: card}


def export_lm(model, run, info: dict, method=None) -> Path:
    """`<run>/export`: the GPT-2 as a transformers GPT2LMHeadModel folder, tokenizer (with the
    template as its Jinja chat_template and max_len as model_max_length), qatune.json, README.md.
    Under LoRA the adapter goes to `<run>/adapter` (peft's format) and the export is the merged model."""
    from qatune.train.methods.base import Method

    target = run.run_dir / EXPORT_DIR
    lm = backbone(model)
    if has_lora(lm):
        save_adapter(lm, run.run_dir / ADAPTER_DIR, run.cfg.model.lora, base_model=base_model_name(run.cfg.model))
        lm = merge_lora(lm)
    extra = export_files(run, info, method or Method)
    return export_hf(lm, target, run.tokenizer, extra, info.get("template"), info.get("max_len"))


def base_model_name(model_cfg) -> str | None:
    """What an adapter's `base_model_name_or_path` records: a local folder as an absolute path, a
    hub name as is, nothing for random init (that base exists only inside the run)."""
    if model_cfg.init == "random":
        return None
    path = Path(model_cfg.name)
    return str(path.resolve()) if path.is_dir() else model_cfg.name


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


def exported_card(source: Path, meta: dict) -> str | None:
    """The model card `qatune export` writes beside what it exports from `source`: for a training
    checkpoint, one made from its run (the checkpoint's config, the run's metrics.jsonl up to its
    step, the data counts of the run's own export when there is one); for an exported folder, its
    own card; None for a folder without one (a hub model's files)."""
    from qatune.config import load_config
    from qatune.runs import read_meta
    from qatune.train.checkpoint_export import is_checkpoint_folder
    from qatune.train.config import TrainConfig
    from qatune.train.methods import METHODS, method_class
    from qatune.train.methods.base import Method

    source = Path(source)
    if not is_checkpoint_folder(source):
        card = source / CARD_FILE
        return card.read_text(encoding="utf-8") if card.is_file() else None
    cfg = load_config(TrainConfig, source / "config.yaml")
    run_dir = source.parent.parent
    run_meta = read_meta(str(run_dir / EXPORT_DIR)) or {}
    info = {k: run_meta[k] for k in ("data_report", "prompts") if k in run_meta}
    info.update(meta, method=cfg.method)
    method = method_class(cfg.method) if cfg.method in METHODS else Method
    metrics = final_metrics(run_dir, meta.get("steps"))
    return model_card(cfg, info, metrics, method.summary_fields, method.title, method.config_sections)
