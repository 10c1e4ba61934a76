"""Data-parallel training under torchrun: the launch environment, DDP and FSDP2 (ZeRO-3).

    torchrun --nproc_per_node 4 -m qatune train run.yaml strategy=fsdp

`setup` reads the variables torchrun sets, picks the backend from the device (NCCL on CUDA,
gloo on CPU) and joins the process group; `wrap_ddp` puts the model under
`DistributedDataParallel`, `wrap_fsdp` shards it with `fully_shard` per transformer block, then
the root. `run_training` is what `qatune train` calls.

Why the loss may stay outside the model's forward under FSDP2: the loss applies the LM head
(`head_weight`: GPT-2's tied `wte.weight`, a Llama's `output` or tied embedding) to the hidden
states after `model(...)` returns. The head belongs to the root's parameter group, and FSDP2 never
reshards the root after forward (its parameters would be all-gathered again at once for
backward), so the head's weight is the full, unsharded tensor
until the root's post-backward, which runs after the loss's gradient reached it. We therefore
never pass `reshard_after_forward` to the root; the equality tests against a single process
(tests/test_distributed.py) check the result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from qatune.errors import UserError
from qatune.model.unwrap import blocks as model_blocks
from qatune.utils.device import DTYPES, default_device

# GRADIENT_SUM: each rank's loss is already divided by the label tokens of the whole step, all
# ranks together (`train_step`), so the true gradient is the SUM of the ranks' gradients. DDP and
# FSDP average by default, which would divide it by the world size once more.

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class FSDPConfig:
    cpu_offload: bool = False  # sharded parameters, gradients and AdamW state live in CPU memory
    param_dtype: Literal["fp32", "bf16"] = "fp32"  # dtype of the all-gathered params in compute
    reduce_dtype: Literal["fp32", "bf16"] | None = None  # gradient reduce-scatter; None: param_dtype
    reshard_after_forward: bool = True  # blocks free their gathered params after forward (ZeRO-3)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env(environ=None) -> DistEnv | None:
    """The torchrun launch (None when not launched by torchrun). A partial launch environment is
    an error naming what is missing."""
    environ = os.environ if environ is None else environ
    present = [v for v in TORCHRUN_VARS if v in environ]
    if not present:
        return None
    missing = [v for v in TORCHRUN_VARS if v not in environ]
    if missing:
        raise UserError(
            f"distributed launch: {', '.join(present)} set but {', '.join(missing)} missing; "
            "launch with `torchrun --nproc_per_node N -m qatune train CONFIG`"
        )
    values = {}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            values[var] = int(environ[var])
        except ValueError:
            raise UserError(f"distributed launch: {var}={environ[var]!r} is not an integer") from None
    env = DistEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise UserError(f"distributed launch: RANK={env.rank} is outside 0..WORLD_SIZE-1 ({env.world_size})")
    return env


def check_precision(strategy: str, precision: str) -> None:
    """fp16's loss scaler decides to skip a step from the gradients it sees; under FSDP each rank
    sees only its shard, so ranks could decide differently and drift apart."""
    if strategy == "fsdp" and precision == "fp16":
        raise UserError("precision fp16 is not supported with strategy fsdp: use bf16 (or fsdp.param_dtype=bf16)")


def check_strategy(strategy: str, env: DistEnv | None) -> None:
    if strategy not in ("none", "ddp", "fsdp"):
        raise UserError(f"strategy {strategy!r} is not one of none, ddp, fsdp")
    if strategy != "none" and env is None:
        raise UserError(
            f"strategy {strategy} needs a torchrun launch ({', '.join(TORCHRUN_VARS)} are not set): "
            f"`torchrun --nproc_per_node N -m qatune train CONFIG`, or set strategy=none for one process"
        )
    if strategy == "none" and env is not None and env.world_size > 1:
        raise UserError(
            f"launched with {env.world_size} processes but strategy is none: set strategy=ddp or strategy=fsdp"
        )


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def setup(strategy: str, device: str | None) -> DistEnv:
    """Join the process group torchrun prepared (no-op for a single process); returns this rank."""
    env = read_env()
    check_strategy(strategy, env)
    if env is None:
        return DistEnv()
    want = default_device(device)
    if want.type == "cuda" and want.index is not None and env.world_size > 1:
        raise UserError(f"device {device} under torchrun would put every rank on one GPU: set device=cuda (or unset)")
    if want.type == "cuda":
        torch.cuda.set_device(env.local_rank)  # one GPU per process: "cuda" now means cuda:LOCAL_RANK
    if not dist.is_initialized():
        dist.init_process_group(backend_for(want), rank=env.rank, world_size=env.world_size)
    return env


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap_fsdp(model: nn.Module, cfg: FSDPConfig) -> nn.Module:
    """Shard each transformer block, then the root (embeddings, final LayerNorm): ZeRO-3.
    Activation checkpointing stays the model's own: `checkpoint(block, ...)` calls the sharded
    block, so the all-gather and the recompute both happen inside the block's FSDP hooks."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    param_dtype = DTYPES[cfg.param_dtype]
    reduce_dtype = DTYPES[cfg.reduce_dtype or cfg.param_dtype]
    # Pinned host memory speeds up the copies to a GPU; without a GPU there is nothing to pin.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.cpu_offload else OffloadPolicy()
    common = {"mp_policy": MixedPrecisionPolicy(param_dtype, reduce_dtype), "offload_policy": offload}
    blocks = model_blocks(model)  # of the language model, inside a method's head wrapper too
    for block in blocks:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **common)
    # The root keeps FSDP2's default (no reshard after forward): the loss uses the head's weight after forward.
    fully_shard(model, **common)
    for module in (*blocks, model):
        # Sum, see GRADIENT_SUM; a plain SUM collective (gloo has no pre-multiplied sum).
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return model


def _sum_hook(_state, bucket):
    """DDP communication hook: all-reduce SUM (the default hook averages), see GRADIENT_SUM."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    ddp = DDP(model, device_ids=ids)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def deal_eval_batches(batches: Sequence, rank: int, world_size: int) -> list[tuple[object, bool]]:
    """This rank's share of the held-out batches as (batch, counted) pairs, every rank the same
    number of them: an FSDP forward is a collective, so a rank that ran out would hang the
    others. A rank that runs out repeats a batch whose results are not counted."""
    mine = [(b, True) for b in batches[rank::world_size]]
    need = -(-len(batches) // world_size)
    return mine + [(batches[0], False)] * (need - len(mine))
