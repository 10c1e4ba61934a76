"""Per-layer gradient norms, which a run logs every `monitor.every` steps (and `qatune grads`
reports offline): parameters grouped by layer, norms in fp32, summed over FSDP shards."""

from __future__ import annotations

import math

import torch

from qatune.model.unwrap import plain_name
from qatune.train.step import Precision, global_sum, model_device


def layer_of(param_name: str) -> str:
    """Group parameters by layer: 'embeddings', the blocks ('h.0' … 'h.{L-1}' in GPT-2,
    'layers.0' … in a Llama), then the rest by their first name ('ln_f', 'norm', 'output')."""
    if param_name.startswith(("wte.", "wpe.", "embed_tokens.")):
        return "embeddings"
    if param_name.startswith(("h.", "layers.")):
        return ".".join(param_name.split(".")[:2])
    return param_name.split(".")[0]


def layer_sq_norms(model: torch.nn.Module) -> dict[str, float]:
    """Squared .grad norms grouped by layer; of this rank's shard when gradients are FSDP DTensors."""
    sq: dict[str, float] = {}
    for name, p in model.named_parameters():
        key = layer_of(plain_name(name).removeprefix("backbone."))
        g = p.grad
        if g is not None and hasattr(g, "to_local"):
            g = g.to_local()
        # one pass in fp32, no squared copy of the gradient (the embedding's is vocab x d)
        norm = float(torch.linalg.vector_norm(g.detach(), dtype=torch.float32)) if g is not None else 0.0
        sq[key] = sq.get(key, 0.0) + norm * norm
    return sq


def layer_grad_norms(model, precision: Precision, sharded: bool) -> dict[str, float]:
    """Per-layer norms of the accumulated gradients, unscaled (fp16) and, under FSDP, summed over
    the shards of every rank."""
    sq = layer_sq_norms(model)
    names = sorted(sq)
    values = torch.tensor([sq[n] for n in names], dtype=torch.float64, device=model_device(model))
    if sharded:
        values = global_sum(values)
    scale = precision.scaler.get_scale() if precision.scaler is not None else 1.0
    return {n: math.sqrt(v) / scale for n, v in zip(names, values.tolist())}
