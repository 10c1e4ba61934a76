"""Resume: a run killed with SIGKILL and resumed ends bit-identical to a run never interrupted;
a kill in the middle of a checkpoint write leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.processes import kill_in_optimizer_step, run_cli

from qatune.model.gpt2 import GPT2, GPT2Config
from qatune.train.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow

CONFIG = """
out_dir: {out}
tokenizer: {tok}
model: {{name: gpt2, init: random, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64, dropout: 0.1}}
data: {{sources: [{data}], max_len: 64}}
batch: {{size: 4, accumulation: 2}}
optim: {{lr: 3e-3, warmup_steps: 3}}
eval: {{fraction: 0.1, every: 4}}
max_steps: 10
save_every: 5
threads: 1
tensorboard: false
plots: false
"""


@pytest.fixture
def config(tmp_path, tokenizer_dir) -> Path:
    data = tmp_path / "qa.jsonl"
    with data.open("w") as f:
        for a in range(120):
            b = (a * 37) % 100
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": f"It is {a + b}."}) + "\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path / "runs", tok=tokenizer_dir, data=data))
    return cfg


# after the step-5 checkpoint, in the middle of step 8's update
KILL_AT_STEP_8 = kill_in_optimizer_step(8)

KILL_IN_SECOND_CHECKPOINT_WRITE = """
import os, signal
import torch
import qatune.train.checkpoints as state
_real = torch.save
_count = [0]
def save(obj, f, *a, **k):
    _count[0] += 1
    if _count[0] == 2:  # the step-10 checkpoint: write half a file, then die
        with open(f, "wb") as fh:
            fh.write(b"\\x80\\x02partial")
            fh.flush()
            os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _real(obj, f, *a, **k)
state.torch.save = save
"""


RUNS = ("straight", "killed")


def test_sigkill_then_resume_is_bit_identical(config, tmp_path):
    straight = run_cli("train", str(config), "name=straight", "--no-progress")
    assert straight.returncode == 0, straight.stderr

    killed = run_cli("train", str(config), "name=killed", "--no-progress", killer=KILL_AT_STEP_8)
    assert killed.returncode == -signal.SIGKILL
    runs = tmp_path / "runs"
    assert [s for s, _ in list_checkpoints(runs / "killed" / "checkpoints")] == [5]
    logged = [json.loads(line)["step"] for line in (runs / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6, 7]  # steps 6 and 7 were done, then lost with the process

    resumed = run_cli("train", str(config), "name=killed", "--no-progress", "--resume")
    assert resumed.returncode == 0, resumed.stderr

    a = load_file(str(runs / "straight" / "export" / "model.safetensors"))
    b = load_file(str(runs / "killed" / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    metrics = [[json.loads(x) for x in (runs / r / "metrics.jsonl").read_text().splitlines()] for r in RUNS]
    assert [m["step"] for m in metrics[1]] == list(range(1, 11))  # steps 6, 7 logged once, not twice
    for ma, mb in zip(*metrics):
        assert (ma["loss"], ma["grad_norm"], ma["lr"]) == (mb["loss"], mb["grad_norm"], mb["lr"])
        assert ma.get("eval_loss") == mb.get("eval_loss")

    # The last checkpoint goes without AdamW's state (no step follows it), the step-5 one keeps it;
    # a finished run resumed only exports again, the same weights.
    ckpts = runs / "straight" / "checkpoints"
    state = lambda step: torch.load(ckpts / f"step_{step:08d}" / "state.pt", weights_only=False)  # noqa: E731
    assert state(10)["optimizer"] is None and state(10)["model"]
    assert state(5)["optimizer"]["state"]
    again = run_cli("train", str(config), "name=straight", "--no-progress", "--resume")
    assert again.returncode == 0, again.stderr
    c = load_file(str(runs / "straight" / "export" / "model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_kill_during_checkpoint_write_keeps_previous_loadable(config, tmp_path):
    killed = run_cli("train", str(config), "name=torn", "--no-progress", killer=KILL_IN_SECOND_CHECKPOINT_WRITE)
    assert killed.returncode == -signal.SIGKILL
    ckpts = tmp_path / "runs" / "torn" / "checkpoints"
    assert any(p.name.startswith(".step_00000010") for p in ckpts.iterdir())  # the torn write is there…
    latest = latest_checkpoint(ckpts)
    assert latest is not None and latest.name == "step_00000005"  # …but not taken for a checkpoint
    model = GPT2(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64))
    state = load_checkpoint(latest, model, restore_rng=False)
    assert state["step"] == 5

    resumed = run_cli("train", str(config), "name=torn", "--no-progress", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [s for s, _ in list_checkpoints(ckpts)] == [5, 10]
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # the torn temp folder is cleaned up


def test_resume_without_checkpoint_is_a_clear_error(config):
    result = run_cli("train", str(config), "name=fresh", "--resume")
    assert result.returncode == 2
    assert result.stderr.startswith("qatune train: error: --resume: no checkpoint in")
    assert result.stderr.count("\n") == 1
