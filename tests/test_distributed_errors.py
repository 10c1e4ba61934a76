"""Launch checks and data dealing for distributed training, without starting any process group."""

from __future__ import annotations

import pytest
import torch

from qatune.cli import main
from qatune.config import from_dict
from qatune.data.batching import collate
from qatune.data.example import EncodedExample
from qatune.data.plan import BatchConfig, check_plan_split, plan_run
from qatune.methods.config import TrainConfig
from qatune.train.distributed import (
    TORCHRUN_VARS,
    DistEnv,
    backend_for,
    check_precision,
    check_strategy,
    deal_eval_batches,
    read_env,
)

FULL_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_read_env_full_and_absent():
    assert read_env(FULL_ENV) == DistEnv(rank=1, world_size=2, local_rank=1)
    assert read_env({"PATH": "/bin"}) is None


def test_read_env_names_every_missing_variable():
    with pytest.raises(ValueError, match=r"RANK set but WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        read_env({"RANK": "0"})
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' is not an integer"):
        read_env({**FULL_ENV, "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match=r"RANK=2 is outside"):
        read_env({**FULL_ENV, "RANK": "2"})


def test_strategy_and_launch_must_agree():
    with pytest.raises(ValueError, match=r"strategy fsdp needs a torchrun launch"):
        check_strategy("fsdp", None)
    with pytest.raises(ValueError, match=r"launched with 2 processes but strategy is none"):
        check_strategy("none", DistEnv(0, 2, 0))
    check_strategy("ddp", DistEnv(0, 1, 0))  # torchrun --nproc_per_node 1 is fine
    check_strategy("none", None)
    with pytest.raises(ValueError, match=r"precision fp16 is not supported with strategy fsdp"):
        check_precision("fsdp", "fp16")
    check_precision("ddp", "fp16")  # DDP ranks see the same all-reduced gradients: one decision
    assert backend_for(torch.device("cuda", 0)) == "nccl" and backend_for(torch.device("cpu")) == "gloo"


def test_config_keys():
    cfg = from_dict(TrainConfig, {"strategy": "fsdp", "fsdp": {"cpu_offload": True, "param_dtype": "bf16"}})
    assert cfg.fsdp.cpu_offload and cfg.fsdp.param_dtype == "bf16" and cfg.fsdp.reshard_after_forward
    with pytest.raises(ValueError, match="strategy"):
        from_dict(TrainConfig, {"strategy": "zero3"})
    with pytest.raises(ValueError, match="offload"):
        from_dict(TrainConfig, {"fsdp": {"offload": True}})


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


def test_cli_fsdp_without_torchrun_is_a_one_line_error(tmp_path, capsys, no_torchrun_env):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"out_dir: {tmp_path / 'runs'}\n")
    assert main(["train", str(cfg), "strategy=fsdp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qatune train: error: strategy fsdp needs a torchrun launch") and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_cli_partial_launch_env_names_the_missing_variables(tmp_path, capsys, monkeypatch, no_torchrun_env):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"out_dir: {tmp_path / 'runs'}\nstrategy: ddp\n")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", str(cfg)]) == 2
    assert "LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing" in capsys.readouterr().err


def test_steps_of_a_two_rank_plan_deal_out_over_one_or_two_ranks_not_three():
    plan = plan_run([10] * 40, BatchConfig(size=4, accumulation=1), seed=0, epochs=1, world_size=2)
    assert len(plan) == 5 and all(len(step) == 2 for step in plan.steps)
    check_plan_split(plan, world_size=1, plan_world=2, accumulation=1)
    check_plan_split(plan, world_size=2, plan_world=2, accumulation=1)
    with pytest.raises(ValueError, match=r"set for 2 rank\(s\): step 1 has 2 micro-batches .* the 3 launched"):
        check_plan_split(plan, world_size=3, plan_world=2, accumulation=1)


def test_global_batch_of_a_step_is_the_same_for_one_and_two_ranks():
    lengths = [5 + i % 7 for i in range(64)]
    two = plan_run(lengths, BatchConfig(size=4, accumulation=1), seed=3, epochs=1, world_size=2)
    one = plan_run(lengths, BatchConfig(size=4, accumulation=2), seed=3, epochs=1, world_size=1)
    assert two.steps == one.steps


def _example(n: int, labelled: int) -> EncodedExample:
    ids = list(range(1, n + 1))
    return EncodedExample(ids, [-100] * (n - labelled) + ids[n - labelled :], "t")


def test_eval_batches_are_dealt_evenly_and_fillers_count_nothing():
    batches = [collate([[_example(6 + i, 3)]], 0) for i in range(5)]
    shares = [deal_eval_batches(list(batches), r, 2) for r in range(2)]
    assert [len(s) for s in shares] == [3, 3]  # every rank runs the same number of forwards
    filler, counted = shares[1][-1]
    assert not counted
    assert sum(b.n_label_tokens for s in shares for b, c in s if c) == sum(b.n_label_tokens for b in batches)
    assert [b for b, c in deal_eval_batches(batches, 0, 1) if c] == batches


def test_a_fixed_gpu_index_under_torchrun_is_refused(monkeypatch):
    from qatune.train.distributed import setup

    for var, value in FULL_ENV.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=r"device cuda:0 under torchrun would put every rank on one GPU"):
        setup("ddp", "cuda:0")
