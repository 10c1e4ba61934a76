"""AdamW with weight decay on the right tensors, warmup + cosine, and clipping by global norm.

Decay goes on the weight matrices of the linear layers only. Biases and LayerNorm gains/shifts are
not decayed (pulling a gain toward 0 is not regularization), and neither are the token and
position embeddings, following GPT-2/nanoGPT practice for tied embeddings: the embedding is a
2-D matrix, but decaying it pulls rare tokens' vectors toward 0 (they get few gradient updates to
push back), so it is excluded by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qatune.model.unwrap import plain_name

# Parameters never decayed even though they are 2-D: the token/position embeddings (GPT-2's wte and
# wpe, a Llama's embed_tokens). Decay pulls every row toward 0 each step, and a rare token's row,
# which gets few gradients, would shrink. (An untied Llama head is a linear layer's matrix: decayed.)
NO_DECAY_MATRICES = ("wte.weight", "wpe.weight", "embed_tokens.weight")


@dataclass
class OptimConfig:
    lr: float = 5e-5  # AdamW's peak learning rate, reached after the warmup
    lr_min: float = 5e-6  # the cosine ends here
    warmup_steps: int = 100  # optimizer steps of linear warmup from lr / warmup_steps to lr
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's moment decay rates
    eps: float = 1e-8  # AdamW's denominator epsilon
    weight_decay: float = 0.1  # decoupled decay of the weight matrices (not biases, LayerNorms, embeddings)
    grad_clip: float = 1.0  # max global L2 norm; 0 = no clipping
    fused: bool = True  # fused AdamW kernel where the device supports it, else foreach


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters that get weight decay and of those that do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        base = plain_name(name)
        (decay if p.ndim >= 2 and base not in NO_DECAY_MATRICES else no_decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = decay_split(model)
    params = dict(model.named_parameters())
    return [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay, "names": decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "names": no_decay},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the two decay groups; fused where the parameters' device supports it."""
    groups = param_groups(model, cfg.weight_decay)
    device = next(model.parameters()).device
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.fused and device.type in ("cuda", "cpu", "xpu", "mps"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # an older PyTorch or a dtype the fused kernel lacks
            pass
    return torch.optim.AdamW(groups, foreach=device.type != "cpu" or None, **kwargs)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr over
    `warmup_steps`, then cosine from lr down to lr_min at the last step."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A LambdaLR (so its state is checkpointed like any scheduler) following `lr_at`."""
    base = cfg.lr if cfg.lr > 0 else 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, total_steps) / base)


@dataclass
class ClipResult:
    grad_norm: float  # global L2 norm before clipping
    clipped: bool


def clip_gradients(parameters, max_norm: float, optimizer: torch.optim.Optimizer | None = None) -> ClipResult:
    """Clip by global L2 norm; returns the pre-clip norm. A non-finite norm is reported as is
    (the fp16 scaler then skips the step).

    Gradients are only touched when the norm is over `max_norm` (torch's clip_grad_norm_ always
    multiplies, by 1.0 when the norm is under: one read and write of every gradient for nothing).
    With a fused Adam(W) the clip factor goes into the optimizer's own `grad_scale`, which its
    kernel divides every gradient by while it reads them anyway: clipping then costs no pass at
    all. `finish_clip(optimizer)` after `optimizer.step()` removes it again."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    clip = bool(max_norm and max_norm > 0 and float(norm) > max_norm)
    if clip:
        # the factor clip_grad_norm_ uses: max_norm / (norm + 1e-6)
        if _folds_grad_scale(optimizer, norm):
            optimizer.grad_scale = (norm.detach() + 1e-6) / max_norm
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=None)
    return ClipResult(float(norm), clip)


def _folds_grad_scale(optimizer, norm) -> bool:
    """Whether `optimizer` is a fused Adam(W) that takes a gradient divisor (`grad_scale`, the
    attribute torch's GradScaler sets) and the norm a plain tensor on its device (not a DTensor
    of FSDP, which the fused kernel cannot take)."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) or type(norm) is not torch.Tensor:
        return False
    group = optimizer.param_groups[0]
    return bool(group.get("fused")) and getattr(optimizer, "grad_scale", None) is None


def finish_clip(optimizer: torch.optim.Optimizer) -> None:
    """Forget a clip factor folded into the optimizer (after its step)."""
    if getattr(optimizer, "grad_scale", None) is not None:
        optimizer.grad_scale = None
