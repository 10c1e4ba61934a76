"""`qatune …` in a fresh interpreter, optionally killed with SIGKILL at a chosen point: the
resume tests of every method start real processes and kill them for real."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_cli(*args: str, killer: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """`killer` is code run first that patches in a SIGKILL (see `kill_in_optimizer_step`)."""
    code = textwrap.dedent(killer) + "\nimport sys\nfrom qatune.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def kill_in_optimizer_step(n: int) -> str:
    """Code for `run_cli(killer=…)`: the process SIGKILLs itself inside its n-th optimizer step,
    before the update lands (after whatever checkpoint the steps before it wrote)."""
    return f"""
import os, signal
import qatune.train.runtime as runtime
_real = runtime.optimizer_step
_count = [0]
def optimizer_step(*a, **k):
    _count[0] += 1
    if _count[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(*a, **k)
runtime.optimizer_step = optimizer_step
"""
