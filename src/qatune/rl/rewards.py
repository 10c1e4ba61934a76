"""Rewards for sampled responses: a checkable answer, or a reward model.

Programmatic rewards compare the response with the record's reference answer, with the same
normalization as `qatune eval` (SQuAD's: lowercase, no punctuation or articles):
- `exact_match`: 1 if the normalized answers are equal, else 0;
- `f1`: token-overlap F1 in [0, 1], partial credit;
- `numeric`: GSM8K's convention. The reference's answer is the number after its last `####`; the
  response's is the number after its last `####`, else its last number. 1 if they are equal
  (commas, `$` and trailing `.` ignored), else 0.

A reward model scores (prompt + response) token ids with a scalar head. Every reward must be a
finite number: a NaN or infinite one is an error naming the sample, never averaged into a step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qatune.errors import UserError
from qatune.generation.metrics import exact_match, token_f1


@dataclass
class Sample:
    """One response to score. `where` names the record the prompt came from (file:line)."""

    where: str
    prompt: str
    response: str  # decoded, EOS excluded
    reference: str | None
    prompt_ids: list[int]
    response_ids: list[int]  # EOS included when the model stopped
    stopped_at_eos: bool


RewardFn = Callable[[Sequence[Sample]], Sequence[float]]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> float | None:
    text = text.replace("$", "").replace(",", "").rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The number after the last `####` (GSM8K's answer line), else the last number in the text."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        found = _NUMBER.search(tail)
        return parse_number(found.group()) if found else None
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def numeric_match(prediction: str, reference: str) -> float:
    want, got = final_number(reference), final_number(prediction)
    return float(want is not None and got is not None and math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-9))


PROGRAMMATIC: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "f1": token_f1,
    "numeric": numeric_match,
}


def programmatic_reward(name: str) -> RewardFn:
    if name not in PROGRAMMATIC:
        raise UserError(f"unknown reward {name!r}; known: {', '.join(PROGRAMMATIC)}, or a reward model folder")
    metric = PROGRAMMATIC[name]

    def reward(samples: Sequence[Sample]) -> list[float]:
        missing = next((s for s in samples if s.reference is None), None)
        if missing is not None:
            raise UserError(f"{missing.where}: the {name} reward needs a reference answer, and this record has none")
        return [metric(s.response, s.reference) for s in samples]

    return reward


def model_reward(score_ids: Callable[[list[list[int]]], torch.Tensor], batch_size: int = 16) -> RewardFn:
    """A reward model as a reward: `score_ids(list of prompt + response ids) -> (B,) scores`."""

    def reward(samples: Sequence[Sample]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            out += score_ids([s.prompt_ids + s.response_ids for s in chunk]).float().tolist()
        return out

    return reward


def score(reward_fn: RewardFn, samples: Sequence[Sample], no_eos_penalty: float = 0.0) -> torch.Tensor:
    """Rewards (B,) fp32: the reward function's, minus `no_eos_penalty` for each response that ran
    out of tokens before EOS. A non-finite reward is an error naming its sample."""
    values = list(reward_fn(samples))
    if len(values) != len(samples):
        raise ValueError(f"the reward function returned {len(values)} rewards for {len(samples)} samples")
    for s, v in zip(samples, values):
        if not math.isfinite(v):
            raise UserError(f"{s.where}: the reward of this sample is {v} (response {s.response[:60]!r})")
    rewards = torch.tensor(values, dtype=torch.float32)
    if no_eos_penalty:
        rewards -= no_eos_penalty * torch.tensor([not s.stopped_at_eos for s in samples], dtype=torch.float32)
    return rewards


def make_reward(name: str, eos_id: int, device) -> RewardFn:
    """A programmatic reward by name, or a reward model from a folder (`method: reward`'s export)."""
    if not Path(name).exists():
        return programmatic_reward(name)
    from qatune.model.reward import load_reward_model

    model = load_reward_model(name).to(device).eval()
    return model_reward(lambda seqs: model.score_ids(seqs, eos_id))
