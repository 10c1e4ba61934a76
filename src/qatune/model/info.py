"""Parameter counts by component, computed from the real module (on the meta device: no memory)."""

from __future__ import annotations

import torch

from qatune.model.gpt2 import GPT2, GPT2Config

COMPONENTS = ("embeddings", "attention", "mlp", "layernorm")


def component_of(param_name: str) -> str:
    if param_name.startswith(("wte.", "wpe.")):
        return "embeddings"
    if ".attn." in param_name:
        return "attention"
    if ".mlp." in param_name:
        return "mlp"
    if "ln_" in param_name:
        return "layernorm"
    raise ValueError(f"parameter {param_name!r} belongs to no known component")


def parameter_counts(config: GPT2Config) -> dict[str, int]:
    """{component: count, ..., "total": n}. The LM head is tied to wte, so it adds nothing."""
    with torch.device("meta"):
        model = GPT2(config)
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        counts[component_of(name)] += p.numel()
    counts["total"] = sum(counts[c] for c in COMPONENTS)
    return counts


def model_info(config: GPT2Config, name: str | None = None) -> dict:
    return {
        "name": name,
        "n_layer": config.n_layer,
        "d_model": config.n_embd,
        "n_head": config.n_head,
        "head_dim": config.head_dim,
        "d_ff": config.d_ff,
        "context": config.n_positions,
        "vocab_size": config.vocab_size,
        "parameters": parameter_counts(config),
    }
