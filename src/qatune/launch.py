"""Training as `qatune train` runs it: build the method a config names (`qatune.methods`), its
model and tokenizer, and run it on the runtime (`qatune.train.runtime.run`).

    result = train(load_config(TrainConfig, "configs/tiny-cpu.yaml"))

`run_training` is the same inside a torchrun group; `fit` is supervised fine-tuning on examples a
caller already holds (the demo).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from qatune.data.example import EncodedExample
from qatune.errors import UserError
from qatune.methods import build_method
from qatune.methods.config import TrainConfig
from qatune.methods.sft import SFT
from qatune.model.attention import DecoderLM
from qatune.model.tokenizer import load_tokenizer
from qatune.runs import CHECKPOINTS_DIR
from qatune.train.checkpoints import latest_checkpoint
from qatune.train.distributed import setup, teardown
from qatune.train.runtime import TrainResult, make_model, model_tokenizer, run


def train(
    cfg: TrainConfig,
    resume: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Load tokenizer, the method's data and the model as `cfg` says, then `run`."""
    if resume and latest_checkpoint(Path(cfg.out_dir) / cfg.name / CHECKPOINTS_DIR) is None:
        raise UserError(f"--resume: no checkpoint in {Path(cfg.out_dir) / cfg.name / CHECKPOINTS_DIR}")
    tokenizer = load_tokenizer(cfg.tokenizer or model_tokenizer(cfg.model))
    method = build_method(cfg, tokenizer, rank)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model, len(tokenizer))
    return run(method, model, tokenizer, cfg, resume, rank, world_size, progress, overwrite=overwrite)


def fit(
    model: DecoderLM,
    tokenizer,
    examples: Sequence[EncodedExample],
    cfg: TrainConfig,
    template: dict | None = None,
    resume: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    meta: dict | None = None,
    on_step: Callable[[dict], None] | None = None,
    eval_examples: Sequence[EncodedExample] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Supervised fine-tuning of `model` on `examples`, writing the run folder. The held-out set is
    `eval_examples` when given, else a seeded split of `examples` (cfg.eval.fraction)."""
    method = SFT(examples, template, eval_examples, meta)
    return run(method, model, tokenizer, cfg, resume, rank, world_size, progress, on_step, overwrite)


def run_training(cfg, resume: bool = False, progress: bool = True, overwrite: bool = False):
    """`qatune train` in this process: join the torchrun group if launched by torchrun, train,
    leave the group. Returns the TrainResult on rank 0, None on the other ranks."""
    env = setup(cfg.strategy, cfg.device)
    try:
        result = train(cfg, resume, env.rank, env.world_size, progress, overwrite=overwrite)
    finally:
        teardown()
    return result if env.is_main else None
