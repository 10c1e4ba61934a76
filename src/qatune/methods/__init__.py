"""The training methods, one folder each (sft/, dpo/, reward/, ppo/, grpo/; pairs.py and online/
hold what two of them share), by the name the config's `method:` key gives.

Each registry entry is `module:Class`, imported when chosen, so a method's own dependencies load
only when it is used: a new method is its folder and one line here. A method class has
`from_config(settings, tokenizer, rank)`, which loads its data as the run's shared settings
(`RunSettings`: `settings.data`) say.
"""

from __future__ import annotations

import importlib

from qatune.errors import UserError
from qatune.train.method import Method, RunSettings

METHODS: dict[str, str] = {
    "sft": "qatune.methods.sft:SFT",
    "dpo": "qatune.methods.dpo:DPO",
    "reward": "qatune.methods.reward:Reward",
    "grpo": "qatune.methods.grpo:GRPO",
    "ppo": "qatune.methods.ppo:PPO",
}


def method_class(name: str) -> type[Method]:
    try:
        module, cls = METHODS[name].split(":")
    except KeyError:
        raise UserError(f"method {name!r} is not one of {', '.join(METHODS)}") from None
    return getattr(importlib.import_module(module), cls)


def build_method(cfg, tokenizer, rank: int = 0) -> Method:
    """The method `cfg.method` names, with its data loaded."""
    return method_class(cfg.method).from_config(RunSettings.of(cfg), tokenizer, rank)
