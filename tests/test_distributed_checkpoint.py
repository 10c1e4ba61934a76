"""Sharded (DCP) checkpoints in one process: round trip, atomic write, keep-last-K, RNG.

The 2-process save/resume is in test_distributed.py; here the same functions run without a
process group (DCP then reads and writes as a single rank), which is fast.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from qatune.model.gpt2 import GPT2, GPT2Config
from qatune.train.checkpoints import latest_checkpoint, list_checkpoints
from qatune.train.optim import OptimConfig, build_optimizer, build_scheduler
from qatune.train.sharded_checkpoints import is_sharded, load_sharded, save_sharded, saved_world_size

SMALL = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=97)


def _trained(seed: int):
    torch.manual_seed(seed)
    model = GPT2(SMALL)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=1))
    scheduler = build_scheduler(optimizer, OptimConfig(lr=1e-2, warmup_steps=1), total_steps=10)
    for _ in range(2):
        ids = torch.randint(0, 97, (2, 16))
        model.lm_head(model(ids)).logsumexp(-1).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def _save(folder, step, model, optimizer, scheduler, keep=3):
    return save_sharded(folder, step, model, optimizer, scheduler, None, "seed: 0\n", {"elapsed": 1.5}, keep, 0, 2)


def test_round_trip_restores_weights_optimizer_schedule_and_rng(tmp_path):
    model, optimizer, scheduler = _trained(0)
    torch.manual_seed(123)
    path = _save(tmp_path, 2, model, optimizer, scheduler)
    expected_draw = torch.rand(3)
    assert is_sharded(path) and saved_world_size(path, default=7) == 2

    fresh, fresh_opt, fresh_sched = _trained(1)  # different weights and moments
    torch.manual_seed(999)
    state = load_sharded(path, fresh, fresh_opt, fresh_sched, rank=0)
    assert state["step"] == 2 and state["extra"] == {"elapsed": 1.5} and state["world_size"] == 2
    assert state["batch_world_size"] == 2
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], fresh_opt.state[q][key])
    assert fresh_sched.state_dict()["last_epoch"] == 2 and fresh_opt.param_groups[0]["lr"] == pytest.approx(
        optimizer.param_groups[0]["lr"]
    )
    assert torch.equal(torch.rand(3), expected_draw)  # the generator continues where it was saved


def test_a_last_checkpoint_without_optimizer_state_restores_the_weights(tmp_path):
    """A run's last checkpoint is written without the optimizer (no step follows it): resuming it
    (an optimizer given) restores the weights and leaves the optimizer as it was."""
    model, optimizer, scheduler = _trained(0)
    path = _save(tmp_path, 10, model, None, scheduler)
    fresh, fresh_opt, fresh_sched = _trained(1)
    moments = {k: v.clone() for k, v in fresh_opt.state[next(fresh.parameters())].items()}
    state = load_sharded(path, fresh, fresh_opt, fresh_sched, rank=0)
    assert state["step"] == 10 and state["optimizer_saved"] is False
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for key, value in fresh_opt.state[next(fresh.parameters())].items():
        assert torch.equal(value, moments[key]), key


def test_rank_missing_from_the_saving_run_takes_rank_0s_rng(tmp_path):
    model, optimizer, scheduler = _trained(0)
    torch.manual_seed(5)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    draw = torch.rand(2)
    load_sharded(path, model, rank=3)  # model only; rank 3 never saved an RNG file
    assert torch.equal(torch.rand(2), draw)


def test_keeps_the_newest_and_a_failed_write_leaves_the_previous_latest(tmp_path, monkeypatch):
    model, optimizer, scheduler = _trained(0)
    for step in (1, 2, 3):
        _save(tmp_path, step, model, optimizer, scheduler, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 4, model, optimizer, scheduler, keep=2)
    assert latest_checkpoint(tmp_path).name == "step_00000003"  # the half-written step 4 is invisible
    assert (tmp_path / ".step_00000004.tmp").exists()
    monkeypatch.undo()
    _save(tmp_path, 5, model, optimizer, scheduler, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000005"]  # temp folder gone


def test_single_process_checkpoints_report_world_size_1(tmp_path):
    from qatune.train.checkpoints import save_checkpoint

    model, optimizer, scheduler = _trained(0)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    assert not is_sharded(path) and saved_world_size(path, default=4) == 1
    assert saved_world_size(None, default=4) == 4  # a fresh run: the launched world size
