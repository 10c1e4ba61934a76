"""`qatune train` settings: one typed dataclass tree, loaded from YAML with key=value overrides.

    load_config(TrainConfig, "configs/gpt2-large-sft.yaml", ["optim.lr=3e-5", "batch.size=4"])

Sections: `model` (what to start from), `data` (the data pipeline's DataConfig), `batch` (packing
and accumulation), `optim` (AdamW and the schedule), `eval`, and the run's own settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qatune.data.pipeline import DataConfig
from qatune.data.plan import BatchConfig
from qatune.errors import UserError
from qatune.model.lora import LoRAConfig
from qatune.rl.config import RLConfig
from qatune.train.distributed import FSDPConfig
from qatune.train.optim import OptimConfig
from qatune.train.preference_loss import DPOConfig, RewardConfig


@dataclass
class ModelConfig:
    # A size name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a hub name or a local folder.
    name: str = "gpt2"
    init: Literal["pretrained", "random"] = "pretrained"  # random: the named size, fresh weights
    # Shape overrides for random init (e.g. a tiny model); None keeps the size's value.
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
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
        keys = ("n_layer", "n_embd", "n_head", "n_positions")
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


@dataclass
class TrainConfig:
    name: str = "run"  # the run folder is <out_dir>/<name>
    method: str = "sft"  # the training method: sft, dpo, reward, grpo, ppo (qatune.train.methods)
    out_dir: str = "runs"  # where run folders are made
    model: ModelConfig = field(default_factory=ModelConfig)
    # default: the model folder's own tokenizer files, else $QATUNE_TOKENIZER, else the hub's "gpt2"
    tokenizer: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)  # method dpo: beta, loss, label smoothing, reference
    reward: RewardConfig = field(default_factory=RewardConfig)  # method reward: Bradley-Terry options
    rl: RLConfig = field(default_factory=RLConfig)  # method ppo / grpo: rollouts, rewards, KL (qatune.rl.config)
    epochs: int = 1  # passes over the training data (max_steps overrides)
    max_steps: int | None = None  # the run's length in optimizer steps, past one epoch if need be (overrides epochs)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where supported, else fp32
    # Recompute each block's activations in backward: less memory for one more forward pass per step.
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (measured slower on CPU: docs/performance.md)
    # How packed rows attend: auto = FlexAttention on GPU, per-document SDPA on CPU; dense = the
    # boolean-mask reference; documents / flex force one (docs/performance.md).
    attention: Literal["auto", "dense", "documents", "flex"] = "auto"
    # Data parallelism under torchrun: none (one process), ddp (replicas), fsdp (ZeRO-3 shards).
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)  # used when strategy is fsdp
    loss_chunk: int = 2048  # label rows per LM-head chunk
    seed: int = 0  # the held-out split, the data order, random init, dropout and sampling
    device: str | None = None  # default: cuda if available, else cpu
    threads: int | None = None  # CPU threads (torch.set_num_threads); None = PyTorch's default
    log_every: int = 1  # optimizer steps between metrics.jsonl lines (eval steps and the last are always logged)
    save_every: int = 500  # optimizer steps between checkpoints; 0 = only the final one
    keep_checkpoints: int = 3  # the newest checkpoints kept; older ones are deleted
    # Experiment trackers besides metrics.jsonl: tensorboard, mlflow, wandb (see train/tracking.py).
    tracking: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    tensorboard: bool = True  # false drops tensorboard from `tracking` (the older switch, kept for old configs)
    plots: bool = True  # write <run>/plots (loss, lr, the method's metrics) at checkpoints and the end
    export: bool = True  # write <run>/export (a Hugging Face folder) at the end

    def __post_init__(self) -> None:
        if self.epochs < 1 and self.max_steps is None:
            raise UserError("set epochs >= 1 or max_steps")
        if len(set(self.tracking)) != len(self.tracking):
            raise UserError(f"tracking: {self.tracking} names a tracker twice")

    @property
    def trackers(self) -> list[str]:
        """The trackers this run logs to: `tracking`, less tensorboard when `tensorboard` is false."""
        return [t for t in self.tracking if t != "tensorboard" or self.tensorboard]
