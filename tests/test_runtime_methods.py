"""The runtime is method-neutral: a second method (tests/toy_method.py: loss on prompt tokens
only) trains, resumes bit-identically after SIGKILL, and runs under DDP (tests/test_distributed.py)
without any change to the runtime."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from tests.test_train_monitor import direct_prompt_loss
from tests.test_train_resume import KILL_AT_STEP_8, RUNS, config, run_cli  # noqa: F401 (config: fixture)
from tests.test_train_step import SMALL, examples_of_varied_lengths
from tests.toy_method import NAME, PromptLM

from qatune.methods.config import TrainConfig
from qatune.model.gpt2 import GPT2
from qatune.train.runtime import run

REGISTER = "from tests.toy_method import register\nregister()\n"


def test_a_second_method_trains_on_what_its_step_says(tmp_path):
    torch.manual_seed(0)
    model = GPT2(SMALL)
    exs = examples_of_varied_lengths(16)
    before = direct_prompt_loss(model, exs)
    cfg = TrainConfig(name="toy", out_dir=str(tmp_path), max_steps=30, tensorboard=False, plots=False, export=False)
    cfg.batch.size, cfg.batch.unit, cfg.eval.fraction = 4, "examples", 0.0
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 0
    result = run(PromptLM(exs), model, None, cfg, progress=False)
    n_prompt = sum(sum(1 for label in e.labels[1:] if label == -100) for e in exs)
    assert sum(r["prompt_tokens"] for r in result.history[:4]) == n_prompt  # one epoch: every prompt token once
    assert "label_tokens" not in result.history[0]  # the record holds what the method summarizes
    assert direct_prompt_loss(model, exs) < before - 0.4  # it learned the (random) prompts: 4.58 -> 3.97 nats
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.4


@pytest.mark.slow
def test_a_second_method_resumes_bit_identically_after_sigkill(config, tmp_path):  # noqa: F811
    method = f"method={NAME}"
    straight = run_cli("train", str(config), "name=straight", method, "--no-progress", killer=REGISTER)
    assert straight.returncode == 0, straight.stderr
    killed = run_cli("train", str(config), "name=killed", method, "--no-progress", killer=REGISTER + KILL_AT_STEP_8)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli("train", str(config), "name=killed", method, "--no-progress", "--resume", killer=REGISTER)
    assert resumed.returncode == 0, resumed.stderr
    runs = tmp_path / "runs"
    a, b = (load_file(str(runs / r / "export" / "model.safetensors")) for r in RUNS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [[json.loads(x) for x in (runs / r / "metrics.jsonl").read_text().splitlines()] for r in RUNS]
    assert [m["step"] for m in metrics[1]] == list(range(1, 11))
    for ma, mb in zip(*metrics):
        assert (ma["loss"], ma["grad_norm"], ma["prompt_tokens"]) == (mb["loss"], mb["grad_norm"], mb["prompt_tokens"])
