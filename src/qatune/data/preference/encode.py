"""Preference records -> token ids: the rendered prompt and each response tokenized separately.

As for SFT (`qatune.data.encode`), the prompt and the responses are tokenized on their own and
concatenated, never found again by searching the joined text: GPT-2's BPE merges across the
boundary ("Answer: " + "Paris" is not the tokens of "Answer: Paris"). Each response ends with
exactly one EOS id (a literal `<|endoftext|>` at its end is replaced, not doubled), so the policy
learns where a preferred answer stops.

The model's own chat template (`template: model`) renders each pair as two conversations, the
prompt (or history) then the response as the assistant turn, each tokenized whole as
apply_chat_template tokenizes it (`qatune.data.encode`). The prompt is the generation prompt's ids
(what GRPO/PPO and `generate` prompt with), which each whole conversation must start with; the
response is the assistant span the template marks, up to and including its end-of-turn token
(`<|im_end|>`): the tokens SFT trains, and the last one the reward model scores. What the template
writes after that token (ChatML's newline) is left out: no model is asked to write it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qatune.data.encode import span_labels, strip_final_eos, tokenize_with_eos
from qatune.data.example import IGNORE, EncodedExample
from qatune.data.model_template import ModelTemplate
from qatune.data.preference.records import PreferenceRecord
from qatune.data.records import DataError, Message
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
    records: Sequence[PreferenceRecord], template: Template | ModelTemplate, tokenizer, chunk_size: int = 2048
) -> list[EncodedPair]:
    """Batched fast tokenization of every pair's prompt (rendered by `template`) and responses."""
    if isinstance(template, ModelTemplate):
        return encode_chat_pairs(records, template.bind(tokenizer), tokenizer)
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


def pair_history(record: PreferenceRecord) -> list[Message]:
    return record.messages if record.messages is not None else [Message("user", record.prompt)]


def encode_chat_pairs(records: Sequence[PreferenceRecord], template: ModelTemplate, tokenizer) -> list[EncodedPair]:
    """Each pair through the model's chat template: [history, chosen] and [history, rejected]."""
    out: list[EncodedPair] = []
    for r in records:
        history = template.chat(pair_history(r))
        prompt = template.render(history, add_generation_prompt=True)
        [prompt_ids] = tokenize(tokenizer, [prompt])[0]
        responses = [strip_final_eos(x) for x in (r.chosen, r.rejected)]
        rendered = [
            template.render_with_spans([*history, {"role": "assistant", "content": x}], r.where) for x in responses
        ]
        ids, offsets = tokenize(tokenizer, [text for text, _ in rendered])
        chosen, rejected = (
            chat_response(r.where, prompt_ids, seq, offs, spans)
            for seq, offs, (_, spans) in zip(ids, offsets, rendered)
        )
        out.append(EncodedPair(prompt_ids, chosen, rejected, r.source, r.where, r.margin))
    return out


def tokenize(tokenizer, texts: list[str]) -> tuple[list[list[int]], list]:
    """Ids (no special tokens added: the template writes its own) and character offsets."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    return [list(x) for x in enc["input_ids"]], enc["offset_mapping"]


def chat_response(where: str, prompt_ids: list[int], ids: list[int], offsets, spans) -> list[int]:
    """The response's ids: the conversation's tokens after the generation prompt, to the end of the
    assistant span. An error naming the record when the conversation does not start with the
    prompt's ids (a template or tokenizer that merges the prompt's end into the answer)."""
    labels, start = span_labels(ids, offsets, spans[-1:])
    if not spans or ids[: len(prompt_ids)] != prompt_ids or start != len(prompt_ids):
        raise DataError(
            f"{where}: the chat template's conversation does not start with its generation prompt's tokens, so "
            "the response's tokens cannot be told apart from the prompt's; use one of qatune's templates"
        )
    end = max(i for i, t in enumerate(labels) if t != IGNORE) + 1
    return ids[start:end]
