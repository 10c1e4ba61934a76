"""Token-length statistics of preference pairs, the way DPO and reward training see them.

Prompt, chosen and rejected lengths (responses with their EOS), before truncation; length bias
(how often the chosen response is the longer one: a reward model or DPO can learn "longer wins"
from it instead of the preference); what every pair policy would cut or drop at max_len.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qatune.data.preference.encode import EncodedPair
from qatune.data.preference.truncation import PAIR_POLICIES, PairTruncationCounts, plan_pair
from qatune.data.stats import summarize
from qatune.data.stats_render import Table, num, pct


def length_bias(pairs: Sequence[EncodedPair]) -> dict:
    """Share of pairs whose chosen response has more tokens than the rejected one (and fewer, equal)."""
    n = len(pairs)
    longer = sum(len(p.chosen_ids) > len(p.rejected_ids) for p in pairs)
    shorter = sum(len(p.chosen_ids) < len(p.rejected_ids) for p in pairs)
    diff = sum(len(p.chosen_ids) - len(p.rejected_ids) for p in pairs)
    return {
        "chosen_longer": longer / n if n else 0.0,
        "chosen_shorter": shorter / n if n else 0.0,
        "equal": (n - longer - shorter) / n if n else 0.0,
        "mean_difference": diff / n if n else 0.0,  # chosen - rejected tokens
    }


def pair_stats(pairs: Sequence[EncodedPair], max_len: int, identical: int = 0) -> dict:
    """Everything `qatune stats` reports on preference data (pairs before truncation)."""
    longest = [p.longest for p in pairs]
    over = sum(n > max_len for n in longest)
    truncation = {}
    for policy in PAIR_POLICIES:
        counts = PairTruncationCounts(policy, max_len)
        for p in pairs:
            counts.add(p, plan_pair(p, policy, max_len, raise_errors=False))
        truncation[policy] = counts.to_dict()
    return {
        "kind": "preference",
        "pairs": len(pairs),
        "identical_dropped": identical,
        "max_len": max_len,
        "prompt_tokens": summarize([len(p.prompt_ids) for p in pairs]),
        "chosen_tokens": summarize([len(p.chosen_ids) for p in pairs]),
        "rejected_tokens": summarize([len(p.rejected_ids) for p in pairs]),
        "longest_sequence_tokens": summarize(longest),
        "length_bias": length_bias(pairs),
        "over_max_len": {"count": over, "share": over / len(pairs) if pairs else 0.0},
        "truncation": truncation,
    }


def pair_tables(stats: dict) -> list[Table]:
    keys = ("sum", "mean", "median", "p90", "p99", "max")
    lengths = [
        [label, *(num(stats[field][k]) for k in keys)]
        for label, field in (
            ("prompt", "prompt_tokens"),
            ("chosen (with EOS)", "chosen_tokens"),
            ("rejected (with EOS)", "rejected_tokens"),
            ("prompt + longer response", "longest_sequence_tokens"),
        )
    ]
    bias, over = stats["length_bias"], stats["over_max_len"]
    summary = [
        ["pairs", f"{stats['pairs']:,}"],
        ["identical pairs dropped", f"{stats['identical_dropped']:,}"],
        ["chosen longer than rejected", pct(bias["chosen_longer"])],
        ["chosen shorter than rejected", pct(bias["chosen_shorter"])],
        ["same length", pct(bias["equal"])],
        ["mean chosen - rejected tokens", f"{bias['mean_difference']:+.1f}"],
        [f"over max_len {stats['max_len']}", f"{over['count']:,} ({pct(over['share'])})"],
    ]
    trunc = [
        [
            policy,
            f"{t['kept']:,}",
            f"{t['truncated']:,}",
            f"{t['prompt_cut']:,}",
            f"{t['responses_cut']:,}",
            f"{t['eos_lost']:,}",
            f"{t['dropped']:,}",
            f"{t['identical_after_cut']:,}",
            f"{t['errors']:,}" if policy == "error" else "-",
            pct(t["response_tokens_out"] / t["response_tokens_in"]) if t["response_tokens_in"] else "-",
        ]
        for policy, t in stats["truncation"].items()
    ]
    head = ["policy", "kept", "truncated", "prompt cut", "responses cut", "EOS lost", "dropped", "identical once cut"]
    return [
        ("Token lengths (before truncation)", ["tokens", *keys], lengths),
        ("Summary", ["", "value"], summary),
        (
            f"Truncation at max_len {stats['max_len']} per sequence, every pair policy",
            [*head, "would fail", "response tokens kept"],
            trunc,
        ),
    ]


def save_pair_plots(pairs: Sequence[EncodedPair], max_len: int, out_dir: Path) -> list[Path]:
    """lengths_hist.png (prompt, chosen, rejected) and lengths_cdf.png (with the max_len line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from qatune.data.stats_render import save

    series = {
        "prompt": np.array([len(p.prompt_ids) for p in pairs]),
        "chosen": np.array([len(p.chosen_ids) for p in pairs]),
        "rejected": np.array([len(p.rejected_ids) for p in pairs]),
    }
    longest = np.array([p.longest for p in pairs])
    top = max(int(longest.max()), max_len, 2)
    bins = np.unique(np.round(np.logspace(0, np.log10(top + 1), 60))) - 0.5
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in series.items():
        ax.hist(np.maximum(values, 1), bins=bins, alpha=0.5, label=f"{name} (mean {values.mean():.0f})")
    ax.set_xscale("log")
    ax.set_xlabel("tokens (log scale)")
    ax.set_ylabel("pairs")
    ax.set_title("Prompt, chosen and rejected lengths")
    ax.legend()
    paths = [out_dir / "lengths_hist.png", out_dir / "lengths_cdf.png"]
    save(fig, paths[0])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in {**series, "prompt + longer response": longest}.items():
        xs = np.sort(values)
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
    share = float(np.mean(longest > max_len))
    ax.axvline(max_len, color="red", linestyle="--", label=f"max_len {max_len} ({100 * share:.1f}% over)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("share of pairs at or below")
    ax.set_title("Cumulative distribution of lengths")
    ax.legend()
    save(fig, paths[1])
    return paths
