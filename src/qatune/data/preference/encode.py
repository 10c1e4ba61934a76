"""Preference records -> token ids: the rendered prompt and each response tokenized separately.

As for SFT (`qatune.data.encode`), the prompt and the responses are tokenized on their own and
concatenated, never found again by searching the joined text: GPT-2's BPE merges across the
boundary ("Answer: " + "Paris" is not the tokens of "Answer: Paris"). Each response ends with
exactly one EOS id (a literal `<|endoftext|>` at its end is replaced, not doubled), so the policy
learns where a preferred answer stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qatune.data.encode import strip_final_eos, tokenize_with_eos
from qatune.data.example import IGNORE, EncodedExample
from qatune.data.preference.records import PreferenceRecord
from qatune.data.templates import Template


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response + EOS
    rejected_ids: list[int]  # response + EOS
    source: str = ""
    where: str = ""
    margin: float | None = None

    @property
    def n_tokens(self) -> int:
        """Tokens the pair occupies in a packed row: the prompt twice, once before each response."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def longest(self) -> int:
        """Tokens of its longer sequence (prompt + the longer response): what max_len bounds."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def sequences(self) -> tuple[EncodedExample, EncodedExample]:
        """(prompt + chosen, prompt + rejected), labels on the response tokens only."""
        mask = [IGNORE] * len(self.prompt_ids)
        return tuple(
            EncodedExample(self.prompt_ids + r, mask + r, self.source) for r in (self.chosen_ids, self.rejected_ids)
        )


def encode_pairs(
    records: Sequence[PreferenceRecord], template: Template, tokenizer, chunk_size: int = 2048
) -> list[EncodedPair]:
    """Batched fast tokenization of every pair's prompt (rendered by `template`) and responses."""
    eos = tokenizer.eos_token_id
    out: list[EncodedPair] = []
    for start in range(0, len(records), chunk_size):
        chunk = records[start : start + chunk_size]
        texts = []
        for r in chunk:
            responses = [template.render_response(strip_final_eos(x)) for x in (r.chosen, r.rejected)]
            texts += [r.prompt_text(template), *responses]
        ids = tokenize_with_eos(texts, tokenizer)
        for k, r in enumerate(chunk):
            prompt, chosen, rejected = ids[3 * k : 3 * k + 3]
            out.append(EncodedPair(prompt, chosen + [eos], rejected + [eos], r.source, r.where, r.margin))
    return out
