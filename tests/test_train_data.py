"""Step planning: every example once per epoch, rank shards disjoint, token budgets, resume-stable."""

from __future__ import annotations

import random

import pytest
import torch

from qatune.data.example import IGNORE, EncodedExample
from qatune.data.plan import BatchConfig, make_batch, plan_run, rank_share, split_holdout

LENGTHS = [random.Random(0).randint(5, 120) for _ in range(103)]


def flat(step):
    return [i for micro in step for i in micro]


@pytest.mark.parametrize("strategy", ["packed", "grouped"])
@pytest.mark.parametrize("unit,size", [("examples", 4), ("tokens", 300)])
def test_each_epoch_sees_every_example_once(strategy, unit, size):
    cfg = BatchConfig(strategy=strategy, size=size, unit=unit, accumulation=3)
    plan = plan_run(LENGTHS, cfg, seed=1, epochs=2)
    for epoch in (0, 1):
        seen = [i for s, e in zip(plan.steps, plan.epoch_of_step) if e == epoch for i in flat(s)]
        assert sorted(seen) == list(range(len(LENGTHS)))
    assert all(len(s) <= 3 for s in plan.steps)
    if unit == "tokens":
        for step in plan.steps:
            for micro in step:
                cost = (
                    len(micro) * max(LENGTHS[i] for i in micro)
                    if strategy == "grouped"
                    else sum(LENGTHS[i] for i in micro)
                )
                assert cost <= size or len(micro) == 1


def test_epochs_are_shuffled_differently_and_plans_are_reproducible():
    cfg = BatchConfig(size=4)
    plan = plan_run(LENGTHS, cfg, seed=1, epochs=2)
    assert plan.steps == plan_run(LENGTHS, cfg, seed=1, epochs=2).steps  # a resumed run rebuilds it
    first = [s for s, e in zip(plan.steps, plan.epoch_of_step) if e == 0]
    second = [s for s, e in zip(plan.steps, plan.epoch_of_step) if e == 1]
    assert first != second


def test_ranks_share_a_step_without_duplication():
    cfg = BatchConfig(size=4, accumulation=2)
    plan = plan_run(LENGTHS, cfg, seed=0, epochs=1, world_size=3)
    seen = []
    for step in plan.steps:
        shares = [rank_share(step, r, 3) for r in range(3)]
        assert len({len(s) for s in shares}) == 1  # every rank does the same number of micro-batches
        seen += [i for share in shares for i in flat(share)]
    assert len(seen) == len(set(seen))  # no example twice
    assert len(seen) >= len(LENGTHS) - 4 * 3  # at most one incomplete round of micro-batches dropped


def test_max_steps_cuts_the_plan():
    plan = plan_run(LENGTHS, BatchConfig(size=8), seed=0, epochs=0, max_steps=30)
    assert len(plan) == 30 and plan.epoch_of_step[-1] == 2  # 13 steps per epoch


def test_holdout_split_is_disjoint_seeded_and_capped():
    train, held = split_holdout(100, 0.1, 5, seed=0)
    assert len(held) == 5 and not set(train) & set(held) and len(train) == 95
    assert split_holdout(100, 0.1, 5, seed=0) == (train, held)
    with pytest.raises(ValueError, match="no training examples"):
        split_holdout(3, 1.0, None, seed=0)


def test_packed_batch_rows_hold_several_examples_and_no_padding_beyond_the_longest_row():
    exs = [EncodedExample(list(range(1, n + 1)), [IGNORE] * 2 + list(range(3, n + 1))) for n in (30, 20, 10, 60)]
    batch = make_batch(exs, "packed", 64, pad_id=0)
    assert batch.input_ids.shape == (2, 60)  # [60] and [30, 20, 10]
    assert batch.n_tokens == 120 and batch.n_examples == 4
    assert batch.doc_ids is not None and int(batch.doc_ids.max()) == 2
    assert torch.equal(batch.position_ids[1, 30:50], torch.arange(20))


def test_a_packed_micro_batch_never_needs_more_rows_than_planned():
    """A token budget of 8 rows x 100 tokens: 15 examples of 51 tokens fit the budget (765 tokens)
    but need 15 rows, since no two share a row. The plan must close the micro-batch at 8 rows."""
    from qatune.data.batching import pack_bins

    lengths = [51] * 30 + [20] * 30 + [97] * 5
    cfg = BatchConfig(strategy="packed", size=800, unit="tokens")
    plan = plan_run(lengths, cfg, seed=0, epochs=1, row_capacity=100)
    micros = [m for step in plan.steps for m in step]
    assert sorted(i for m in micros for i in m) == list(range(len(lengths)))
    assert max(len(pack_bins([lengths[i] for i in m], 100)) for m in micros) == 8
    examples = [EncodedExample([1] * n, [1] * n) for n in lengths]
    assert all(make_batch([examples[i] for i in m], "packed", 100, 0).input_ids.shape[0] <= 8 for m in micros)
