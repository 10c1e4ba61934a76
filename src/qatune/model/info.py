"""A model's shape and parameter counts by component, for either family, computed from the real
module (built on the meta device: no memory), so that they equal the model's `num_parameters()`.

A config is a `GPT2Config` or a `LlamaConfig`: from a size name (`SIZES` of either model file,
offline) or from a folder's config.json, read by its family's loader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from qatune.model import hf_io, llama, llama_hf_io
from qatune.model.gpt2 import GPT2, GPT2Config
from qatune.model.gpt2 import SIZES as GPT2_SIZES
from qatune.model.llama import Llama, LlamaConfig

ModelConfig = GPT2Config | LlamaConfig

# Every named size of every family (the names do not overlap).
SIZES: dict[str, ModelConfig] = {**GPT2_SIZES, **llama.SIZES}

# The components a parameter can belong to, per family, in the order they are printed.
GPT2_COMPONENTS = ("embeddings", "attention", "mlp", "layernorm")
LLAMA_COMPONENTS = ("embeddings", "attention", "mlp", "rmsnorm", "lm_head")
COMPONENTS = GPT2_COMPONENTS  # GPT-2's, under its old name


def family_name(config: ModelConfig) -> str:
    return "gpt2" if isinstance(config, GPT2Config) else config.model_type


def build(config: ModelConfig) -> nn.Module:
    """The family's model for `config`, randomly initialised on the current default device."""
    return GPT2(config) if isinstance(config, GPT2Config) else Llama(config)


def config_from_folder(folder: str | os.PathLike) -> ModelConfig:
    """The config a folder's config.json describes, read by its family's loader (GPT-2 when
    model_type is absent, as `families.from_pretrained` does)."""
    config_file = Path(folder) / "config.json"
    if not config_file.exists():
        raise hf_io.CheckpointError(f"{folder} has no config.json")
    hf = json.loads(config_file.read_text())
    if hf.get("model_type", "gpt2") == "gpt2":
        return hf_io.config_from_hf(hf)
    return llama_hf_io.config_from_hf(hf, str(config_file))


def component_of(param_name: str) -> str:
    """The component of a parameter of either family, by its name in our model."""
    if param_name.startswith(("wte.", "wpe.", "embed_tokens.")):
        return "embeddings"
    if ".attn." in param_name or ".self_attn." in param_name:  # Qwen3's q/k norms count as attention
        return "attention"
    if ".mlp." in param_name:
        return "mlp"
    if "ln_" in param_name:
        return "layernorm"
    if "layernorm" in param_name or param_name.startswith("norm."):
        return "rmsnorm"
    if param_name.startswith("output."):
        return "lm_head"
    raise ValueError(f"parameter {param_name!r} belongs to no known component")


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """{component: count, ..., "total": n}, total == the model's `num_parameters()`. A tied head
    (GPT-2 always, Llama-family models with tie_word_embeddings) adds nothing; an untied one is
    `lm_head`."""
    with torch.device("meta"):
        model = build(config)
    components = GPT2_COMPONENTS if isinstance(config, GPT2Config) else LLAMA_COMPONENTS
    counts = dict.fromkeys(components, 0)
    for name, p in model.named_parameters():
        counts[component_of(name)] += p.numel()
    if not isinstance(config, GPT2Config) and config.tie_embeddings:
        del counts["lm_head"]
    counts["total"] = sum(counts.values())
    return counts


def model_info(config: ModelConfig, name: str | None = None) -> dict:
    info = {
        "name": name,
        "model_type": family_name(config),
        "n_layer": config.n_layer,
        "d_model": config.n_embd,
        "n_head": config.n_head,
        "n_kv_head": config.n_kv_head,
        "head_dim": config.head_dim,
        "d_ff": config.d_ff,
        "context": config.n_positions,
        "vocab_size": config.vocab_size,
    }
    if isinstance(config, LlamaConfig):
        info["tied_head"] = config.tie_embeddings
    info["parameters"] = parameter_counts(config)
    return info
