"""The end of a run: gather the weights (FSDP), write the Hugging Face folder, qatune.json and the
model card (README.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from qatune.model.families import export_hf
from qatune.model.lora import has_lora, merge_lora, save_adapter
from qatune.model.unwrap import backbone
from qatune.runs import ADAPTER_DIR, EXPORT_DIR, META_FILE
from qatune.train.model_card import CARD_FILE, final_metrics, model_card
from qatune.train.sharded_checkpoints import full_state_dict


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def meta_text(info: dict) -> str:
    return json.dumps(info, indent=2, default=_json_default) + "\n"


def export_files(cfg, run_dir: Path, info: dict, method) -> dict[str, str]:
    """The files written beside an export's weights (in the same atomic write): qatune.json, and
    the model card from the run's resolved config, `info` and the final metrics in metrics.jsonl.
    method: the Method (class or instance) whose fields, title and config sections the card shows."""
    metrics = final_metrics(run_dir, info.get("steps"))
    card = model_card(cfg, info, metrics, method)
    return {META_FILE: meta_text(info), CARD_FILE: card}


def export_lm(model, run, info: dict, files: dict[str, str]) -> Path:
    """`<run>/export`: the language model as a transformers folder of its family (GPT2LMHeadModel,
    LlamaForCausalLM, Qwen2ForCausalLM …), tokenizer (with the
    template as its Jinja chat_template and max_len as model_max_length), qatune.json, README.md.
    Under LoRA the adapter goes to `<run>/adapter` (peft's format) and the export is the merged model."""
    target = run.run_dir / EXPORT_DIR
    lm = backbone(model)
    if has_lora(lm):
        model_cfg = run.settings.model
        save_adapter(lm, run.run_dir / ADAPTER_DIR, model_cfg.lora, base_model=base_model_name(model_cfg))
        lm = merge_lora(lm)
    return export_hf(lm, target, run.tokenizer, files, template=info.get("template"), max_len=info.get("max_len"))


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
