"""Scoring with a reward model: pair accuracy and score statistics (`qatune eval` on a reward
model), and a score per record (`qatune score`).

Every sequence is prompt (rendered by the template the model was trained with) + response + EOS,
fitted into max_len the way training fitted pairs (the prompt's end and the response's start,
`cut_pair`); the head reads the last token before the EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qatune.data.preference.encode import EncodedPair
from qatune.data.preference.truncation import cut_lengths


def fit(prompt: list[int], response: list[int], max_len: int) -> list[int]:
    keep_prompt, room = cut_lengths(len(prompt), len(response), max_len)
    return prompt[len(prompt) - keep_prompt :] + response[:room]


def score_pairs(rm, pairs: Sequence[EncodedPair], eos_id: int, max_len: int, batch_size: int = 16):
    """(chosen scores, rejected scores), (P,) each."""
    chosen = rm.score_ids([fit(p.prompt_ids, p.chosen_ids, max_len) for p in pairs], eos_id, batch_size)
    rejected = rm.score_ids([fit(p.prompt_ids, p.rejected_ids, max_len) for p in pairs], eos_id, batch_size)
    return chosen, rejected


def describe(scores: torch.Tensor) -> dict:
    a = scores.double().numpy()
    p10, p50, p90 = np.percentile(a, [10, 50, 90]) if len(a) else (0.0, 0.0, 0.0)
    return {
        "mean": float(a.mean()) if len(a) else 0.0,
        "std": float(a.std()) if len(a) else 0.0,
        "min": float(a.min()) if len(a) else 0.0,
        "p10": float(p10),
        "median": float(p50),
        "p90": float(p90),
        "max": float(a.max()) if len(a) else 0.0,
    }


def pair_report(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Pair accuracy (chosen scores strictly higher), ties, margins and the score distributions."""
    n = len(chosen)
    margin = chosen - rejected
    return {
        "pairs": n,
        "accuracy": float((margin > 0).double().mean()) if n else 0.0,
        "ties": int((margin == 0).sum()),
        "margin": describe(margin),
        "chosen": describe(chosen),
        "rejected": describe(rejected),
        "all": describe(torch.cat([chosen, rejected])),
    }


def report_lines(report: dict) -> list[str]:
    """The report as a Markdown table (also printed on the terminal)."""
    keys = ("mean", "std", "min", "p10", "median", "p90", "max")
    lines = [
        f"pairs {report['pairs']:,}: accuracy {report['accuracy']:.3f} (chosen scores higher), ties {report['ties']}",
        "",
        "| scores | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name in ("chosen", "rejected", "margin", "all"):
        lines.append(f"| {name} | " + " | ".join(f"{report[name][k]:.4f}" for k in keys) + " |")
    return lines
