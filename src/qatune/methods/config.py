"""`qatune train` settings: one typed dataclass tree, loaded from YAML with key=value overrides.

    load_config(TrainConfig, "configs/gpt2-large-sft.yaml", ["optim.lr=3e-5", "batch.size=4"])

Sections: `model` (what to start from), `data` (the data pipeline's DataConfig), `batch` (packing
and accumulation), `optim` (AdamW and the schedule), `eval`, `monitor`, each method's own section
(`dpo`, `reward`, `rl`), and the run's own settings. It lives with the methods because it holds
every method's section; the runtime reads only the runtime's settings from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qatune.data.pipeline import DataConfig
from qatune.data.plan import BatchConfig
from qatune.errors import UserError
from qatune.kernels.loss import DEFAULT_CHUNK
from qatune.methods.dpo.loss import DPOConfig
from qatune.methods.online.config import RLConfig
from qatune.methods.reward.loss import RewardConfig
from qatune.train.config import EvalConfig, ModelConfig, MonitorConfig
from qatune.train.distributed import FSDPConfig
from qatune.train.optim import OptimConfig


@dataclass
class TrainConfig:
    name: str = "run"  # the run folder is <out_dir>/<name>
    method: str = "sft"  # the training method: sft, dpo, reward, grpo, ppo (qatune.methods)
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
    rl: RLConfig = field(
        default_factory=RLConfig
    )  # method ppo / grpo: rollouts, rewards, KL (methods/online/config.py)
    epochs: int = 1  # passes over the training data (max_steps overrides)
    max_steps: int | None = None  # the run's length in optimizer steps, past one epoch if need be (overrides epochs)
    # auto: bf16 on a GPU that supports it and on a CPU whose bf16 matmul measured >= 2x its fp32 one (a
    # sub-second probe cached per machine; the pick and rates go to stderr and precision.json), else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Recompute each block's activations in backward: less memory for one more forward pass per step.
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (measured slower on CPU: docs/performance.md)
    # How packed rows attend: auto = FlexAttention on GPU, per-document SDPA on CPU; dense = the
    # boolean-mask reference; documents / flex force one (docs/performance.md).
    attention: Literal["auto", "dense", "documents", "flex"] = "auto"
    # Data parallelism under torchrun: none (one process), ddp (replicas), fsdp (ZeRO-3 shards).
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)  # used when strategy is fsdp
    loss_chunk: int = DEFAULT_CHUNK  # label rows per LM-head chunk
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
