"""The progress line shows what each method declares, and only that: a record's other metrics (a
DPO step's `kl`, a metric a method adds later, a null) cannot break it. The end-to-end runs of
every method through `qatune train` with the display on are in test_method_defaults.py."""

from __future__ import annotations

import pytest

from qatune.methods import METHODS, method_class
from qatune.train.progress import Progress, step_info

STEP = {"step": 2, "epoch": 0, "loss": 0.6931, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1234.0}
RECORDS = {  # one step record of each method, with the fields its summarize writes
    "sft": {**STEP, "label_tokens": 40, "eval_loss": 2.5, "eval_ppl": 12.18},
    "dpo": {**STEP, "pairs": 4, "reward_accuracy": 0.75, "margin": 0.01, "kl": 0.002, "eval_reward_accuracy": 0.5},
    "reward": {**STEP, "pairs": 4, "accuracy": 0.25, "margin": -0.1, "score_std": 0.3, "eval_accuracy": 0.5},
    "ppo": {**STEP, "reward": 0.5, "kl": 0.01, "value_loss": 0.2, "eval_reward": 0.25, "eval_kl": 0.02},
    "grpo": {**STEP, "reward": 0.5, "kl": 0.01, "flat_group_rate": 0.5, "eval_reward": 0.25},
}
SHOWN = {
    "sft": "loss 0.6931  lr 1.00e-03  1,234 tok/s  eval 2.5000  ppl 12.18",
    "dpo": "loss 0.6931  lr 1.00e-03  1,234 tok/s  acc 0.75  margin 0.010  eval acc 0.50",
    "reward": "loss 0.6931  lr 1.00e-03  1,234 tok/s  acc 0.25  margin -0.100  eval acc 0.50",
    "ppo": "loss 0.6931  lr 1.00e-03  1,234 tok/s  reward 0.500  KL 0.010  eval reward 0.250  eval KL 0.020",
    "grpo": "loss 0.6931  lr 1.00e-03  1,234 tok/s  reward 0.500  KL 0.010  eval reward 0.250",
}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_shows_its_declared_fields(method):
    assert step_info(RECORDS[method], method_class(method).progress_fields) == SHOWN[method]


def test_a_dpo_record_with_kl_is_not_read_as_an_rl_step():
    """A DPO record carries `kl`; the RL fields it lacks (reward) are left out, not looked up."""
    rl_fields = method_class("grpo").progress_fields
    assert step_info(RECORDS["dpo"], rl_fields) == "loss 0.6931  lr 1.00e-03  1,234 tok/s  KL 0.002"


def test_missing_null_and_non_numeric_values_are_left_out():
    fields = (("loss", "loss {:.4f}"), ("new", "new {:.2f}"), ("flag", "flag {:.1f}"), ("name", "n {:.1f}"))
    assert step_info({"loss": None, "flag": True, "name": "x"}, fields) == ""
    assert step_info({"loss": float("nan"), "new": 3}, fields) == "loss nan  new 3.00"


def test_plain_lines_on_a_pipe_print_eval_steps_and_the_last(capsys):
    fields = method_class("dpo").progress_fields
    bar = Progress(total=3, start=0, enabled=True, fields=fields)  # stderr is captured: not a terminal
    bar.update({**RECORDS["dpo"], "step": 1, "eval_loss": 0.7})
    bar.update({k: v for k, v in RECORDS["dpo"].items() if not k.startswith("eval_")})  # step 2: not due
    bar.update({**RECORDS["dpo"], "step": 3})
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["step 1/3", "step 3/3"]
    assert "eval 0.7000" in lines[0] and "acc 0.75" in lines[1]
