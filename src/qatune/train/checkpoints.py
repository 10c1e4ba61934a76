"""Training checkpoints of a single process: everything a killed run needs to continue to the same
numbers (sharded ones: `sharded_checkpoints`; Hugging Face model folders: `qatune.model.hf_io`).

A checkpoint is a folder `checkpoints/step_00000123/` holding `state.pt` (model, optimizer,
scheduler, grad scaler, RNG states, step = data position) and `config.yaml`. It is written into a
temp folder and renamed into place (`atomic_dir`), so a kill during the write leaves at most a
hidden `.step_….tmp` folder that is ignored and cleaned up: the previous checkpoint stays the
latest loadable one. Only the last `keep` checkpoints are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import torch

from qatune.errors import UserError
from qatune.model.unwrap import unwrap
from qatune.utils.files import atomic_dir

STATE_FILE = "state.pt"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state without its frozen parameters, which every run rebuilds from its config
    (pretrained folder or seed): a LoRA checkpoint holds the adapters only, not the base."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state_dict(model, state: dict, source) -> None:
    """Load what `trainable_state_dict` saved: strict about everything except frozen parameters."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise UserError(
            f"{source}: the checkpoint does not fit the model (missing: {', '.join(missing[:4]) or '-'}; "
            f"unexpected: {', '.join(unexpected[:4]) or '-'}); was model.lora changed?"
        )


def save_checkpoint(
    folder: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    scaler=None,
    config_yaml: str = "",
    extra: dict | None = None,
    keep: int = 3,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`. `optimizer`
    None: a checkpoint no step will follow (a run's last), written without its state."""
    folder = Path(folder)
    target = folder / checkpoint_name(step)
    state = {
        "step": step,
        "model": trainable_state_dict(unwrap(model)),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    with atomic_dir(target) as tmp:
        torch.save(state, tmp / STATE_FILE)
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    prune_checkpoints(folder, keep)
    return target


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (hidden temp folders of interrupted writes are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(folder: Path, keep: int) -> None:
    for _, path in list_checkpoints(folder)[: -keep if keep > 0 else None]:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in Path(folder).glob(".step_*.tmp"):  # from a write that was killed
        shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None, scaler=None, restore_rng: bool = True) -> dict:
    """Restore what was saved into the given objects; returns the raw state (step, extra …)."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
    load_trainable_state_dict(unwrap(model), state["model"], path)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state
