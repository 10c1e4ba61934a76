"""A run folder as its writer sees it: one writer at a time, never two runs mixed in one folder.

- `RunLock`: an exclusive `fcntl` lock on `<run>/.lock` for the life of the run, holding the
  writer's pid; a second process gets an error that names it. The kernel drops the lock when the
  process dies, so a killed run never leaves a stale lock behind.
- `prepare_fresh`: a new run into a folder that already holds checkpoints is refused (it would
  resume, prune or export the other run's work) unless `overwrite`, which clears the folder.
- `check_resume`: the checkpoint a `--resume` continues from must belong to this run: the saved
  config equals this one except for settings that do not change the numbers (logging, eval,
  checkpoint cadence, devices), and its step lies within this run's plan.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from qatune.config import ConfigError
from qatune.errors import UserError
from qatune.runs import CHECKPOINTS_DIR
from qatune.train.checkpoints import list_checkpoints

LOCK_FILE = ".lock"

# Settings a resumed run may change: they decide what is logged, saved or where it runs, not the
# numbers of the optimization (a resumed run on another number of ranks keeps its global batch).
RESUME_FREE = (
    "eval", "monitor", "log_every", "save_every", "keep_checkpoints", "tensorboard", "tracking", "plots",
    "export", "threads", "device", "strategy", "fsdp", "compile", "activation_checkpointing", "out_dir", "name",
)  # fmt: skip


class RunLock:
    """Exclusive lock on a run folder (see the module docstring). Use as a context manager."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"{self.path.parent} is in use by another qatune process (pid {holder}); "
                    "wait for it to finish or train into another folder (name=…)"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def prepare_fresh(run_dir: Path, overwrite: bool) -> None:
    """Before a fresh (not resumed) run: refuse a folder holding another run's checkpoints, or
    clear it when `overwrite` (everything but the lock this process holds)."""
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir / CHECKPOINTS_DIR)
    if not overwrite:
        if found:
            raise UserError(
                f"{run_dir} already holds a run (checkpoint at step {found[-1][0]}): continue it with --resume, "
                "replace it with --overwrite, or train into another folder (name=…)"
            )
        return
    for entry in run_dir.iterdir() if run_dir.is_dir() else []:
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _resolved(saved_yaml: str, resolve: Callable[[Any], str] | None) -> str:
    """The saved config as `resolve` fills it in; as written when it no longer loads (an older
    qatune's keys), so that the comparison names what differs."""
    if resolve is None:
        return saved_yaml
    try:
        return resolve(yaml.safe_load(saved_yaml))
    except (ConfigError, ValueError):
        return saved_yaml


def config_differences(saved_yaml: str, current_yaml: str) -> list[str]:
    """`key: saved -> current` for every setting that differs and matters to the numbers."""
    saved, current = _flatten(yaml.safe_load(saved_yaml) or {}), _flatten(yaml.safe_load(current_yaml) or {})
    free = lambda key: key.split(".")[0] in RESUME_FREE
    keys = sorted(k for k in saved.keys() | current.keys() if not free(k) and saved.get(k) != current.get(k))
    return [f"{k}: {saved.get(k, '(unset)')!r} there, {current.get(k, '(unset)')!r} here" for k in keys]


def check_resume(
    checkpoint: Path,
    step: int,
    current_yaml: str,
    total_steps: int,
    saved_total: int | None,
    resolve: Callable[[Any], str] | None = None,
) -> None:
    """The checkpoint belongs to this run, or a ValueError that says what differs. `resolve`: the
    saved config's mapping -> its YAML with the defaults the run resolves filled in, as `current_yaml`
    has them (a checkpoint written before a setting was resolved recorded it unresolved)."""
    config_file = Path(checkpoint) / "config.yaml"
    problems = []
    if config_file.exists():
        saved = config_file.read_text(encoding="utf-8")
        problems = config_differences(_resolved(saved, resolve), current_yaml)
    if saved_total is not None and saved_total != total_steps:
        problems.append(f"the plan has {saved_total} steps there, {total_steps} here (did the data change?)")
    if step > total_steps:
        problems.append(f"its step {step} lies past this run's {total_steps} steps")
    if problems:
        raise UserError(
            f"--resume: {checkpoint} belongs to another run: " + "; ".join(problems)
            + ". Start a new run (name=…) or replace this one with --overwrite"
        )  # fmt: skip
