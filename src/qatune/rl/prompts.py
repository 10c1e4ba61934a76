"""The prompts an RL run samples from: records rendered through the run's template, as token ids,
with their reference answers (for programmatic rewards and evaluation).

The same path as `qatune eval` / `qatune generate`: a record's prompt through the template (or a
conversation's history up to its last assistant turn), a prompt too long for the context cut from
the left — its end holds the question and the answer cue — and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from qatune.generation.batch import PromptItem, prompt_ids


@dataclass
class Prompt:
    where: str  # file:line of the record
    text: str  # the prompt as the model sees it (template applied)
    reference: str | None  # the record's answer, EOS text removed
    ids: list[int]


def encode_prompts(items: list[PromptItem], tokenizer, budget: int) -> tuple[list[Prompt], int]:
    """(prompts, how many were cut from the left to `budget` tokens)."""
    out, cut = [], 0
    for item in items:
        ids, was_cut = prompt_ids(tokenizer, item, budget)
        cut += was_cut
        out.append(Prompt(item.where, item.text, item.reference, ids))
    return out, cut
