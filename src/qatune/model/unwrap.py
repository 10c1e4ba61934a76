"""The model inside its wrappers, and parameter names without them: the one place that knows
how DDP (`module`), torch.compile (`_orig_mod`) and a method's head wrapper (`backbone`: a value
or score head around the language model) hold the module they wrap. FSDP2 wraps in place and adds nothing."""

from __future__ import annotations

import re

import torch

WRAPPERS = ("module", "_orig_mod")  # DDP's and torch.compile's attribute holding the wrapped module


def unwrap(model):
    """`model` without its DDP and torch.compile layers (a head wrapper stays)."""
    for attr in WRAPPERS:
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return unwrap(inner)
    return model


def backbone(model):
    """The language model (any family's) inside whatever wraps it: DDP, torch.compile, a method's head wrapper."""
    for attr in (*WRAPPERS, "backbone"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return backbone(inner)
    return model


def blocks(model) -> torch.nn.ModuleList:
    """The transformer blocks of the language model inside `model`: GPT-2's `h`, a Llama's `layers`."""
    lm = backbone(model)
    return lm.h if hasattr(lm, "h") else lm.layers


def compiled(model) -> bool:
    """Whether `model`, or a module it wraps, runs under torch.compile."""
    if hasattr(model, "_orig_mod"):
        return True
    inner = [getattr(model, a, None) for a in ("module", "backbone")]
    return any(isinstance(m, torch.nn.Module) and compiled(m) for m in inner)


def plain_name(name: str) -> str:
    """A parameter or module name as in the unwrapped model: every DDP / torch.compile segment
    ("module.", "_orig_mod.") removed."""
    return re.sub(r"(^|\.)(module|_orig_mod)\.", r"\1", name)
