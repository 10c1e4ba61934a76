"""Sharded checkpoints for DDP/FSDP runs with `torch.distributed.checkpoint` (DCP).

Layout of `<run>/checkpoints/step_00000040/`:

    dcp/               model and AdamW state, one file per writing rank plus `.metadata`
                       (tensors keyed by parameter name, so any number of ranks can read them)
    rng/rank_00000.pt  each rank's RNG state
    state.pt           written once: step, world size, scheduler, scaler, extra (elapsed …)
    config.yaml

Every rank writes into `.step_00000040.tmp`; after a barrier rank 0 adds `state.pt` and renames
the folder, so `step_*` folders are always complete and `state.list_checkpoints` finds them like
single-process ones. Resuming on another number of ranks works (DCP reshards on load); a
single process (strategy none) can load them too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from qatune.train.checkpoints import STATE_FILE, checkpoint_name, prune_checkpoints, rng_state, set_rng_state
from qatune.train.distributed import barrier

DCP_DIR = "dcp"
# Frozen parameters (a LoRA run's base) are rebuilt from the config, not checkpointed; loading
# expects exactly the trainable ones (dcp.load fails on any of those missing from the files).
TRAINABLE = StateDictOptions(ignore_frozen_params=True)
LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)
RNG_DIR = "rng"


def is_sharded(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def saved_world_size(path: Path | None, default: int) -> int:
    """The number of ranks the run's global batch was set for (its first launch) as checkpoint
    `path` records it; single-process checkpoints: 1; no checkpoint: `default`."""
    if path is None:
        return default
    if not is_sharded(path):  # memory-mapped: only the small `extra` dict is actually read
        state = torch.load(Path(path) / STATE_FILE, mmap=True, map_location="cpu", weights_only=False)
        return int(state["extra"].get("batch_world_size", 1))
    return int(torch.load(Path(path) / STATE_FILE, weights_only=False)["batch_world_size"])


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns when it runs without a process group; a single process doing it is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / RNG_DIR / f"rank_{rank:05d}.pt"


def save_sharded(
    folder: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    scaler,
    config_yaml: str,
    extra: dict,
    keep: int,
    rank: int,
    world_size: int,
    batch_world_size: int | None = None,
    rank_extra: dict | None = None,
) -> Path:
    """Collective: every rank calls it. Writes checkpoint `step`, then keeps the newest `keep`;
    `optimizer` None: without the optimizer's state (a run's last checkpoint).
    batch_world_size: the ranks the global batch was set for, when resumed on another number.
    rank_extra: this rank's own state (a method's rollout buffer …), kept beside its RNG state."""
    folder = Path(folder)
    target = folder / checkpoint_name(step)
    tmp = folder / f".{target.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / RNG_DIR).mkdir(parents=True)
    barrier()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINABLE)
        shards = {"model": model_sd, "optim": optim_sd}
    else:  # a run's last checkpoint: no step follows it
        shards = {"model": get_model_state_dict(model, options=TRAINABLE)}
    with _one_process_is_fine():
        dcp.save(shards, checkpoint_id=str(tmp / DCP_DIR))
    torch.save({**rng_state(), "rank_extra": rank_extra or {}}, _rng_file(tmp, rank))
    barrier()  # every rank's shards and RNG file are on disk
    if rank == 0:
        state = {
            "format": "dcp",
            "step": step,
            "world_size": world_size,  # ranks that wrote it
            "batch_world_size": batch_world_size or world_size,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "optimizer_saved": optimizer is not None,
            "extra": extra,
        }
        torch.save(state, tmp / STATE_FILE)
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        _fsync_tree(tmp)
        if target.exists():  # a resumed run writing the same step again
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_tree(folder, files=False)
        prune_checkpoints(folder, keep)
    barrier()  # nobody moves on (or reads the folder) before the rename
    return target


def _fsync_tree(root: Path, files: bool = True) -> None:
    """fsync the files under `root` (files=True), else just the folder `root` itself."""
    for path in root.rglob("*") if files else [root]:
        if path.is_file() or not files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            except OSError:  # not every filesystem lets a folder be fsynced
                pass
            finally:
                os.close(fd)


def load_sharded(path: Path, model, optimizer=None, scheduler=None, scaler=None, rank: int = 0) -> dict:
    """Restore a sharded checkpoint into `model` (plain, DDP or FSDP, any number of ranks) and the
    rest; returns state.pt's contents (step, world_size, extra …) and this rank's `rank_extra`."""
    path = Path(path)
    state = torch.load(path / STATE_FILE, weights_only=False)
    with _one_process_is_fine():
        if optimizer is not None and state.get("optimizer_saved", True):
            model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINABLE)
            both = {"model": model_sd, "optim": optim_sd}
            dcp.load(both, checkpoint_id=str(path / DCP_DIR))
            set_state_dict(
                model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"], options=LOAD
            )
        else:
            only = {"model": get_model_state_dict(model, options=TRAINABLE)}
            dcp.load(only, checkpoint_id=str(path / DCP_DIR))
            set_state_dict(model, [], model_state_dict=only["model"], optim_state_dict={}, options=LOAD)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    # A rank the saving run did not have starts from rank 0's generator state.
    rng = _rng_file(path, rank) if _rng_file(path, rank).exists() else _rng_file(path, 0)
    rank_state = torch.load(rng, weights_only=False)
    set_rng_state(rank_state)
    state["rank_extra"] = rank_state.get("rank_extra", {})
    return state


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Collective: the whole unsharded model state on rank 0's CPU (other ranks get {})."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
