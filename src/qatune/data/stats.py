"""Token-length statistics of a data set, the way training will see it.

Prompt tokens (Q) are every token without loss: template, instruction, context, and for
conversations the system/user turns (and untrained answers). Response tokens (A) are the tokens in
the loss: the answer and its EOS. Statistics are taken before truncation; truncation is then
simulated under every policy, and the padding each batching strategy would compute is measured on
the examples the default policy keeps.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from qatune.data.batching import pack_bins, padding_fraction
from qatune.data.encode import Encoding
from qatune.data.example import IGNORE
from qatune.data.plan import BatchConfig, epoch_micro_batches, fill_by_tokens
from qatune.data.report import TruncationCounts
from qatune.data.token_cost import cost_warning
from qatune.data.truncation import DEFAULT_POLICY, DROP_WARN_SHARE, POLICIES, Outcome, most_kept, plan


def summarize(values: Sequence[int]) -> dict:
    """sum, mean, median, p90, p99, max (percentiles by linear interpolation, numpy's default)."""
    if not len(values):
        return {"sum": 0, "mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0, "max": 0}
    a = np.asarray(values, dtype=np.int64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "sum": int(a.sum()),
        "mean": float(a.mean()),
        "median": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": int(a.max()),
    }


def lengths_of(encodings: Sequence[Encoding]) -> tuple[list[int], list[int]]:
    """(prompt tokens, response tokens) per example: tokens without and with loss."""
    answers = [enc.n_label_tokens for enc in encodings]
    return [len(enc) - a for enc, a in zip(encodings, answers)], answers


def length_stats(encodings: Sequence[Encoding], max_len: int) -> dict:
    q, a = lengths_of(encodings)
    total = [x + y for x, y in zip(q, a)]
    over = sum(1 for t in total if t > max_len)
    n_q, n_a = sum(q), sum(a)
    return {
        "examples": len(encodings),
        "prompt_tokens": summarize(q),
        "response_tokens": summarize(a),
        "total_tokens": summarize(total),
        # E[A]/E[Q]: > 1 when answers are longer than prompts; below 1 most of each sequence is unmasked
        # prompt, which costs compute but gives no loss.
        "response_to_prompt_ratio": (n_a / n_q) if n_q else None,
        "loss_token_share": n_a / (n_q + n_a) if n_q + n_a else 0.0,
        "over_max_len": {"count": over, "share": over / len(total) if total else 0.0},
    }


def labels_kept(enc: Encoding, outcome: Outcome) -> int:
    if outcome.keep == [(0, len(enc))]:
        return enc.n_label_tokens
    return sum(1 for a, b in outcome.keep for i in range(a, b) if enc.labels[i] != IGNORE)


def truncation_stats(encodings: Sequence[Encoding], max_len: int) -> tuple[dict, list[int]]:
    """Counts under every policy, and the lengths the default policy keeps (for the padding study)."""
    out = {}
    kept_lengths: list[int] = []
    for policy in POLICIES:
        counts = TruncationCounts(policy, max_len)
        for enc in encodings:
            outcome = plan(enc, policy, max_len, raise_errors=False)
            counts.add(len(enc), enc.n_label_tokens, outcome, None if outcome.dropped else labels_kept(enc, outcome))
            if policy == DEFAULT_POLICY and not outcome.dropped:
                kept_lengths.append(sum(b - a for a, b in outcome.keep))
        out[policy] = counts.to_dict()
    return out, kept_lengths


def training_rows(
    lengths: Sequence[int], max_len: int, strategy: str, size: int, unit: str, seed: int
) -> tuple[int, int]:
    """(rows, computed positions) of one epoch batched as training batches it (`qatune.data.plan`'s
    planner: batch.strategy / size / unit): packed micro-batches are packed into rows of at most
    max_len by `pack_bins`, grouped ones hold one example a row; every micro-batch is padded to
    its longest row."""
    rows = positions = 0
    cfg = BatchConfig(strategy=strategy, size=size, unit=unit)
    for micro in epoch_micro_batches(lengths, cfg, seed, row_capacity=max_len):
        if strategy == "packed":
            bins = pack_bins([lengths[i] for i in micro], max_len)
            row_lengths = [sum(lengths[micro[j]] for j in b) for b in bins]
        else:
            row_lengths = [lengths[i] for i in micro]
        rows += len(row_lengths)
        positions += len(row_lengths) * max(row_lengths)
    return rows, positions


def padding_stats(lengths: Sequence[int], max_len: int, batch_size: int, seed: int = 0, unit: str = "examples") -> dict:
    """Share of computed positions that are padding, for these example lengths. `length_grouped`
    and `packing` are what training computes with batch.size = `batch_size` (in `unit`s) and
    strategy grouped / packed; padding to max_len and random batches are the baselines."""
    n = len(lengths)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if unit == "examples":
        random_batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    else:
        random_batches = fill_by_tokens(order, lengths, batch_size, padded=True)
    grouped_rows, grouped_positions = training_rows(lengths, max_len, "grouped", batch_size, unit, seed)
    rows, positions = training_rows(lengths, max_len, "packed", batch_size, unit, seed)

    def batched(batches):
        rows = [lengths[i] for b in batches for i in b]
        widths = [max(lengths[i] for i in b) for b in batches for _ in b]
        return padding_fraction(rows, widths)

    return {
        "batch_size": batch_size,
        "batch_unit": unit,
        "pad_to_max_len": padding_fraction(list(lengths), [max_len] * n),
        "pad_to_longest_random": batched(random_batches),
        "length_grouped": 1.0 - sum(lengths) / grouped_positions if grouped_positions else 0.0,
        "packing": 1.0 - sum(lengths) / positions if positions else 0.0,
        "packing_rows": rows,
    }


def best_truncation(truncation: dict[str, dict]) -> dict:
    """The policy that keeps the most examples, against the default."""
    kept = {policy: t["kept"] for policy, t in truncation.items()}
    best = most_kept(kept)
    examples = truncation[DEFAULT_POLICY]["examples_in"]
    return {"policy": best, "kept": kept[best], "default_kept": kept[DEFAULT_POLICY], "examples": examples}


def data_warnings(stats: dict) -> list[str]:
    """What a user must hear before training on this data: text that costs far more tokens than
    English, and a default truncation that drops more than a few percent of the examples."""
    out = []
    cost = cost_warning(stats.get("chars_per_token", {}))
    if cost:
        out.append(cost)
    b = stats["best_truncation"]
    dropped = b["examples"] - b["default_kept"]
    if b["examples"] and dropped > DROP_WARN_SHARE * b["examples"]:
        text = f"truncation {DEFAULT_POLICY} at max_len {stats['max_len']} drops {dropped} of {b['examples']} examples"
        if b["kept"] > b["default_kept"]:
            text += f"; {b['policy']} keeps {b['kept']} (data.truncation={b['policy']})"
        out.append(text)
    return out


def compute_stats(
    encodings: Sequence[Encoding],
    max_len: int,
    batch_size: int = 8,
    groups: dict[str, list[int]] | None = None,
    batch_unit: str = "examples",
) -> dict:
    """Everything `qatune stats` reports; `groups` maps a source name to the indices of its examples
    for the per-source breakdown."""
    stats = length_stats(encodings, max_len)
    stats["max_len"] = max_len
    stats["truncation"], kept = truncation_stats(encodings, max_len)
    stats["best_truncation"] = best_truncation(stats["truncation"])
    stats["padding"] = padding_stats(kept, max_len, batch_size, unit=batch_unit)
    if groups and len(groups) > 1:
        stats["per_source"] = {name: length_stats([encodings[i] for i in idx], max_len) for name, idx in groups.items()}
    return stats
