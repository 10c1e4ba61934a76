"""A run folder holds one run, written by one process; a stop keeps the work; failures end in one
line. (Each of these was seen to go wrong before: runs mixed in one folder, Ctrl-C losing up to
`save_every` steps, max_steps silently capped at one epoch, tracebacks for OOM and a full disk.)"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file
from tests.test_train_resume import config  # noqa: F401 (fixture)

import qatune.train.checkpoints as state
import qatune.train.runtime as runtime
from qatune.cli import main
from qatune.data.plan import BatchConfig, plan_run
from qatune.train.checkpoints import list_checkpoints, load_checkpoint
from qatune.train.run_dir import RunLock


def train(cfg_path, *args: str) -> int:
    return main(["train", str(cfg_path), *args, "--no-progress"])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_unless_overwrite(config, tmp_path, capsys):  # noqa: F811
    assert train(config, "name=a", "max_steps=6") == 0
    capsys.readouterr()
    assert train(config, "name=a") == 2
    line = one_line_error(capsys)
    assert line.startswith("qatune train: error: ") and "already holds a run (checkpoint at step 6)" in line
    assert "--overwrite" in line and "--resume" in line
    assert [s for s, _ in list_checkpoints(tmp_path / "runs" / "a" / "checkpoints")] == [5, 6]  # untouched

    assert train(config, "name=a", "--overwrite") == 0
    assert [s for s, _ in list_checkpoints(tmp_path / "runs" / "a" / "checkpoints")] == [5, 10]
    steps = [json.loads(x)["step"] for x in (tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # the new run's metrics only


def test_resume_refuses_a_checkpoint_of_another_run_and_says_what_differs(config, capsys):  # noqa: F811
    assert train(config, "name=b", "max_steps=6") == 0
    capsys.readouterr()
    assert train(config, "name=b", "max_steps=6", "optim.lr=0.001", "seed=1", "--resume") == 2
    line = one_line_error(capsys)
    assert "belongs to another run" in line
    assert "optim.lr: 0.003 there, 0.001 here" in line and "seed: 0 there, 1 here" in line
    # Settings that do not change the numbers may differ.
    assert train(config, "name=b", "max_steps=6", "log_every=2", "plots=true", "--resume") == 0


def test_a_second_writer_gets_an_error_naming_the_first(config, tmp_path, capsys):  # noqa: F811
    with RunLock(tmp_path / "runs" / "c"):
        assert train(config, "name=c") == 2
        line = one_line_error(capsys)
        assert f"in use by another qatune process (pid {os.getpid()})" in line
    assert train(config, "name=c", "max_steps=2") == 0  # released with the holder


def test_max_steps_is_the_run_length_past_one_epoch():
    lengths = [5] * 10
    plan = plan_run(lengths, BatchConfig(size=2, unit="examples"), seed=0, epochs=1, max_steps=12)
    assert len(plan) == 12 and plan.epoch_of_step == [0] * 5 + [1] * 5 + [2] * 2
    for epoch in range(2):
        seen = sorted(i for step in plan.steps[5 * epoch : 5 * epoch + 5] for m in step for i in m)
        assert seen == list(range(10))  # each epoch sees every example once …
    assert plan.steps[:5] != plan.steps[5:10]  # … in a new order
    assert len(plan_run(lengths, BatchConfig(size=2, unit="examples"), seed=0, epochs=3)) == 15


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000 bytes")],
)  # fmt: skip
def test_out_of_memory_is_one_line_naming_the_step_and_what_to_change(config, monkeypatch, capsys, error):  # noqa: F811
    calls = [0]
    real = runtime.accumulate

    def accumulate(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise error
        return real(*a, **k)

    monkeypatch.setattr(runtime, "accumulate", accumulate)
    assert train(config, "name=oom") == 2
    line = one_line_error(capsys)
    assert line.startswith("qatune train: out of memory in step 3 (micro-batches of shape (")
    assert "batch.size" in line and "activation_checkpointing" in line and "qatune plan" in line


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(config, tmp_path, monkeypatch, capsys):  # noqa: F811
    calls, real = [0], state.torch.save

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the step-10 checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(state.torch, "save", save)
    assert train(config, "name=full") == 1
    line = one_line_error(capsys)
    assert line.startswith("qatune train: disk full writing the step-10 checkpoint into ") and "No space" in line
    ckpts = tmp_path / "runs" / "full" / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [5] and sorted(p.name for p in ckpts.iterdir()) == [
        "step_00000005"
    ]
    from qatune.model.gpt2 import GPT2, GPT2Config

    model = GPT2(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64))
    assert load_checkpoint(ckpts / "step_00000005", model, restore_rng=False)["step"] == 5


# --- real signals to a real process --------------------------------------------------------

SLOW_STEPS = """
import time
import qatune.train.runtime as runtime
_real = runtime.optimizer_step
def optimizer_step(*a, **k):
    time.sleep(0.05)  # room for a signal to land mid-run; the numbers do not change
    return _real(*a, **k)
runtime.optimizer_step = optimizer_step
"""


def _start(cfg_path, *args: str) -> subprocess.Popen:
    code = textwrap.dedent(SLOW_STEPS) + "\nimport sys\nfrom qatune.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    cmd = [sys.executable, "-c", code, "train", str(cfg_path), "max_steps=40", "save_every=0", *args, "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_after(proc: subprocess.Popen, metrics, steps: int, signum: int) -> tuple[int, str]:
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_checkpoints_and_resume_is_bit_identical(config, tmp_path, signum, code):  # noqa: F811
    runs = tmp_path / "runs"
    name = f"sig{signum}"
    rc, err = _signal_after(_start(config, f"name={name}"), runs / name / "metrics.jsonl", 3, signum)
    assert rc == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"qatune train: stopped by {signal.Signals(signum).name} after step ") and "--resume" in last
    logged = [json.loads(x)["step"] for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in list_checkpoints(runs / name / "checkpoints")] == [logged[-1]]  # nothing lost
    assert 3 <= logged[-1] < 40
    if signum != signal.SIGTERM:
        return
    resumed = _start(config, f"name={name}", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    straight = _start(config, "name=straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    a = load_file(str(runs / "straight" / "export" / "model.safetensors"))
    b = load_file(str(runs / name / "export" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
