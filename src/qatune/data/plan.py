"""From encoded examples to the micro-batches of every optimizer step, for every rank.

The whole run's plan is a pure function of (example lengths, batch settings, seed): epoch e
shuffles with seed + e, so a resumed run rebuilds the same plan and continues at the saved step
(the data position is just the global step number). Each optimizer step takes
`accumulation x world_size` micro-batches; rank r takes every world_size-th one, so no example is
seen twice in a step and every rank does the same number of micro-batches.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from qatune.data.batching import Batch, collate, length_grouped_batches, pack_bins
from qatune.data.example import EncodedExample
from qatune.errors import UserError


@dataclass
class BatchConfig:
    strategy: Literal["packed", "grouped"] = "packed"  # packed rows (default) or length-grouped rows
    size: int = 8  # per micro-batch, per rank, in `unit`s
    unit: Literal["examples", "tokens"] = "examples"  # what batch.size counts (pairs / responses for those methods)
    accumulation: int = 1  # micro-batches per optimizer step (per rank)

    def __post_init__(self) -> None:
        if self.size < 1 or self.accumulation < 1:
            raise UserError(f"batch.size ({self.size}) and batch.accumulation ({self.accumulation}) must be >= 1")


def split_holdout(n: int, fraction: float, max_examples: int | None, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded random split, held-out part capped."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = int(round(n * fraction)) if fraction > 0 else 0
    if max_examples is not None:
        n_eval = min(n_eval, max_examples)
    if n_eval >= n:
        raise UserError(f"the held-out split ({fraction}) would leave no training examples out of {n}")
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def held_out_split(
    items: Sequence, given: Sequence | None, fraction: float, max_examples: int | None, seed: int
) -> tuple[list, list]:
    """(training items, held-out items): every item trains and `given` is held out when the caller
    brings a held-out set; otherwise a seeded split of `items` (`split_holdout`)."""
    if given is not None:
        return list(items), list(given)
    train_idx, eval_idx = split_holdout(len(items), fraction, max_examples, seed)
    return [items[i] for i in train_idx], [items[i] for i in eval_idx]


def fill_by_tokens(order: Sequence[int], lengths: Sequence[int], budget: int, padded: bool) -> list[list[int]]:
    """Consecutive groups whose token count stays within `budget` (padded: rows x longest row)."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = used = 0
    for i in order:
        n = lengths[i]
        cost = (len(current) + 1) * max(longest, n) if padded else used + n
        if current and cost > budget:
            groups.append(current)
            current, longest, used = [], 0, 0
        current.append(i)
        longest, used = max(longest, n), used + n
    if current:
        groups.append(current)
    return groups


def _fill_packed(order: Sequence[int], lengths: Sequence[int], budget: int, capacity: int) -> list[list[int]]:
    """Consecutive groups within the token budget whose packing (`pack_bins`, as `make_batch` packs
    them) needs at most budget // capacity rows: a token budget alone does not bound the rows, since
    examples that cannot share a row (two of 51 tokens in rows of 100) leave rows part empty."""
    rows = max(1, budget // capacity)
    fits = lambda group: len(pack_bins([lengths[i] for i in group], capacity)) <= rows
    groups: list[list[int]] = []
    start = 0
    while start < len(order):
        end, used = start, 0
        while end < len(order) and (end == start or used + lengths[order[end]] <= budget):
            used += lengths[order[end]]
            end += 1
        if not fits(order[start:end]):  # the longest prefix that packs into `rows` rows
            lo, hi = start + 1, end - 1  # one example always fits one row
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(order[start:mid]) else (lo, mid - 1)
            end = lo
        groups.append(list(order[start:end]))
        start = end
    return groups


def epoch_micro_batches(
    lengths: Sequence[int], cfg: BatchConfig, seed: int, row_capacity: int | None = None
) -> list[list[int]]:
    """One epoch as micro-batches of example indices (into `lengths`). row_capacity: the packed
    row length (max_len); with a token budget, packed micro-batches then never need more than
    size // row_capacity rows, the rows the memory plan counts on."""
    if cfg.strategy == "grouped" and cfg.unit == "examples":
        return length_grouped_batches(lengths, cfg.size, seed=seed)
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(order)
    if cfg.unit == "examples":
        return [order[s : s + cfg.size] for s in range(0, len(order), cfg.size)]
    if cfg.strategy == "packed":
        if row_capacity:
            return _fill_packed(order, lengths, cfg.size, row_capacity)
        return fill_by_tokens(order, lengths, cfg.size, padded=False)
    # grouped by tokens: sort windows by length so rows in a batch are alike, then shuffle batches
    span = 64 * max(1, cfg.size // max(1, max(lengths, default=1)))
    groups: list[list[int]] = []
    for w in range(0, len(order), span):
        window = sorted(order[w : w + span], key=lambda i: lengths[i])
        groups += fill_by_tokens(window, lengths, cfg.size, padded=True)
    rng.shuffle(groups)
    return groups


def plan_steps(micro_batches: list[list[int]], accumulation: int, world_size: int = 1) -> list[list[list[int]]]:
    """Group micro-batches into optimizer steps of accumulation x world_size. A trailing partial
    step is kept when every rank gets at least one micro-batch (its remainder is dropped)."""
    per_step = accumulation * world_size
    steps = [micro_batches[s : s + per_step] for s in range(0, len(micro_batches), per_step)]
    if steps and len(steps[-1]) < per_step:
        keep = len(steps[-1]) // world_size * world_size
        steps[-1] = steps[-1][:keep]
        if not steps[-1]:
            steps.pop()
    return steps


def rank_share(step: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    return step[rank::world_size]


@dataclass
class RunPlan:
    """Every optimizer step of the run: steps[k] = micro-batches (lists of example indices)."""

    steps: list[list[list[int]]]
    epoch_of_step: list[int]

    def __len__(self) -> int:
        return len(self.steps)


def plan_run(
    lengths: Sequence[int],
    cfg: BatchConfig,
    seed: int,
    epochs: int,
    max_steps: int | None = None,
    world_size: int = 1,
    row_capacity: int | None = None,
) -> RunPlan:
    """Every optimizer step of the run: `epochs` epochs, or — when `max_steps` is set — exactly
    `max_steps` steps, cycling through as many epochs as that takes (each reshuffled)."""
    steps: list[list[list[int]]] = []
    epoch_of: list[int] = []
    epoch = 0
    while (epoch < epochs) if max_steps is None else (len(steps) < max_steps):
        micro_batches = epoch_micro_batches(lengths, cfg, seed + epoch, row_capacity)
        epoch_steps = plan_steps(micro_batches, cfg.accumulation, world_size)
        if not epoch_steps:
            raise UserError(f"{len(lengths)} training examples make no optimizer step for {world_size} rank(s)")
        steps += epoch_steps
        epoch_of += [epoch] * len(epoch_steps)
        epoch += 1
    if max_steps is not None:
        steps, epoch_of = steps[:max_steps], epoch_of[:max_steps]
    return RunPlan(steps, epoch_of)


@dataclass
class ExamplePlan:
    """The StepPlan of an offline method: items with a length (examples, preference pairs …)
    grouped into micro-batches and optimizer steps by `plan_run`; `make_batch` collates the items
    of one micro-batch. Batches depend only on the data, so the runtime may prefetch them."""

    run_plan: RunPlan
    items: Sequence
    make_batch: Callable[[list], object]
    prefetch: bool = True

    @classmethod
    def build(
        cls,
        items: Sequence,
        cfg: BatchConfig,
        seed: int,
        epochs: int,
        max_steps: int | None,
        run,
        make_batch,
        row_capacity: int | None = None,
    ):
        """The plan for `run` (a RunContext): set for the ranks the global batch was first set
        for (`run.plan_world`), checked to deal out evenly over the ranks launched. row_capacity:
        the packed row length, which bounds the rows of a token-budget micro-batch."""
        plan = plan_run([len(x) for x in items], cfg, seed, epochs, max_steps, run.plan_world, row_capacity)
        check_plan_split(plan, run.world_size, run.plan_world, cfg.accumulation)
        return cls(plan, items, make_batch)

    def __len__(self) -> int:
        return len(self.run_plan)

    def epoch_of(self, step: int) -> int:
        return self.run_plan.epoch_of_step[step]

    def micro_batches(self, step: int, rank: int, world_size: int) -> list:
        micros = rank_share(self.run_plan.steps[step], rank, world_size)
        return [self.make_batch([self.items[i] for i in m]) for m in micros]


def make_batch(examples: Sequence[EncodedExample], strategy: str, max_len: int, pad_id: int) -> Batch:
    """Packed: best-fit rows of at most max_len tokens, block-causal. Grouped: one example a row."""
    if strategy == "packed":
        rows = [[examples[i] for i in row] for row in pack_bins([len(e) for e in examples], max_len)]
    else:
        rows = [[e] for e in examples]
    return collate(rows, pad_id)


def eval_batches(
    examples: Sequence[EncodedExample], strategy: str, max_len: int, pad_id: int, size: int = 16
) -> list[Batch]:
    """Held-out examples, longest first, in batches of `size` examples (packed like training)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    return [
        make_batch([examples[i] for i in order[s : s + size]], strategy, max_len, pad_id)
        for s in range(0, len(order), size)
    ]


def check_plan_split(plan, world_size: int, plan_world: int, accumulation: int) -> None:
    """Every step's micro-batches must deal out evenly over the ranks (each rank does the same
    number of forward/backward passes, or the collectives would not line up)."""
    for k, step in enumerate(plan.steps):
        if len(step) % world_size:
            raise UserError(
                f"the run's global batch was set for {plan_world} rank(s): step {k + 1} has {len(step)} micro-batches "
                f"(batch.accumulation={accumulation} x {plan_world} rank(s)), which the {world_size} launched "
                f"rank(s) cannot split evenly; launch a number of ranks that divides {len(step)}"
            )
