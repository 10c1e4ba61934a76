"""The prompts an RL run samples from: records rendered through the run's template, as token ids,
with their reference answers (for programmatic rewards and evaluation).

The same path as `qatune eval` / `qatune generate`: a record's prompt through the template (or a
conversation's history up to its last assistant turn), a prompt too long for the context cut from
the left — its end holds the question and the answer cue — and counted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from qatune.data.pipeline import DataConfig
from qatune.data.readers import read_records
from qatune.data.records import DataError
from qatune.generation.batch import PromptItem, prompt_budget, prompt_ids
from qatune.generation.evaluate import prompt_item


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


def load_prompts(cfg: DataConfig, tokenizer, max_new_tokens: int, context: int, log: bool = True) -> list[Prompt]:
    """Every record of `cfg.sources` as a prompt with room for `max_new_tokens` in the context."""
    if not cfg.sources:
        raise DataError("data.sources is empty: give at least one file, folder, glob or dataset name")
    read = read_records(cfg.sources, cfg.mapping, cfg.skip_bad, cfg.limit)
    if not read.records:
        raise DataError(f"no records in {', '.join(cfg.sources)}")
    template = cfg.get_template()
    budget = prompt_budget(min(cfg.max_len, context), max_new_tokens)
    prompts, cut = encode_prompts([prompt_item(r, template) for r in read.records], tokenizer, budget)
    if log:
        skipped = f", {read.skipped} skipped" if read.skipped else ""
        cuts = f", {cut} cut from the left to {budget} tokens" if cut else ""
        print(f"prompts: {len(prompts)} from {', '.join(cfg.sources)}{skipped}{cuts}", file=sys.stderr)
    return prompts
