"""Dropout off in a model being trained, as TRL's `disable_dropout_in_model` does for DPO, reward
modelling, PPO and GRPO.

Those methods compare the training forward with another forward of the same weights: DPO's
log-ratio against the reference (run in eval mode), PPO's and GRPO's ratio pi / pi_old against
the log-probs recorded while sampling (eval mode), the reward model's two scores of one pair. With
dropout on, the first step's ratio is not 1 and DPO's implicit rewards carry dropout noise; off,
the training forward is the eval forward and the first DPO step's loss is exactly log 2.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from qatune.model.gpt2 import GPT2, CausalSelfAttention
from qatune.model.llama import Llama, LlamaAttention

# Modules whose attention-probability dropout is a float attribute `dropout`, and the models whose
# config carries the rate (of every family).
_ATTENTION = (CausalSelfAttention, LlamaAttention)
_MODELS = (GPT2, Llama)


def disable_dropout(module: nn.Module) -> list[str]:
    """Every dropout rate in `module` set to 0: its `nn.Dropout`s (the GPT-2's and LoRA adapters'),
    the attention's rate and each model's config (which also picks the attention kernel and is
    what an export records). Returns the names of the submodules that had a rate above 0."""
    changed = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            m.p = 0.0
            changed.append(name)
        elif isinstance(m, _ATTENTION) and m.dropout > 0:
            m.dropout = 0.0
            changed.append(name)
        if isinstance(m, _MODELS) and m.config.dropout > 0:
            m.config = replace(m.config, dropout=0.0)
    return changed
