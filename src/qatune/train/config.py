"""The runtime's own config sections: `model` (what to start from), `eval` (the held-out split and
how often it is scored) and `monitor` (gradient dynamics). The whole `qatune train` config, with
every method's section, is `qatune.methods.config.TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qatune.model.lora import LoRAConfig


@dataclass
class ModelConfig:
    # A size name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, smollm2-135m), a hub name or a local folder.
    name: str = "gpt2"
    init: Literal["pretrained", "random"] = "pretrained"  # random: the named size, fresh weights
    # Shape overrides for random init (e.g. a tiny model); None keeps the size's value.
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None  # Llama-family sizes: key/value heads (grouped-query attention)
    n_positions: int | None = None
    dropout: float = 0.0
    # Dropout off in the training forward (every rate set to 0, the critic's too); None = the
    # method's choice: off for dpo, reward, ppo and grpo, whose losses compare the training
    # forward with an eval-mode one (the reference, the rollout), as TRL does; on for sft.
    disable_dropout: bool | None = None
    # LoRA adapters (`lora: {r: 16, alpha: 32, targets: [...]}`, see qatune.model.lora); the base is
    # frozen and only the adapters train. None = full fine-tuning.
    lora: LoRAConfig | None = None

    def shape_overrides(self) -> dict:
        keys = ("n_layer", "n_embd", "n_head", "n_kv_head", "n_positions")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class EvalConfig:
    fraction: float = 0.05  # share of the examples held out (seeded split)
    max_examples: int | None = 500  # at most this many held out; None = no cap
    every: int = 200  # optimizer steps between evaluations (and at the end); 0 = only at the end
    batch_size: int = 16  # held-out examples (or pairs) per forward pass


@dataclass
class MonitorConfig:
    """Gradient dynamics watched during training (see `qatune grads` for the offline analysis)."""

    every: int = 50  # optimizer steps between per-layer grad norms + prompt-token loss; 0 = off
    clip_window: int = 50  # steps over which the clip rate is averaged
