"""What text costs in tokens: characters per token of each field, tokenized alone.

A byte-level BPE trained mostly on English (GPT-2's) spends about one token per 4-4.6 characters of
English and several tokens per character of scripts and diacritics it rarely saw, so the same
passage fills max_len several times sooner. Measured with the GPT-2 tokenizer on the shared data:

    t0_qa_subset (English)   prompt 4.57, completion 4.44 characters per token (19,162 records)
    gsm8k train (English)    question 4.25; answer 3.02 (digits and <<48/2=24>> notes)
    xquad_vi (Vietnamese)    context 1.20, question 1.17, answer 1.35 (426 records)

`COSTLY_BELOW` sits between the two: under 2.5 characters per token a field costs at least 1.8x the
tokens English text of the same length would (4.5 / 2.5), far more than the spread between English
sets (GSM8K's numeric answers, the cheapest English field measured, are 3.0).
"""

from __future__ import annotations

from collections.abc import Sequence

from qatune.data.example import EOS_TEXT
from qatune.data.records import Record

ENGLISH_CHARS_PER_TOKEN = 4.5  # GPT-2 BPE on English prose, measured above (t0: 4.44-4.57)
COSTLY_BELOW = 2.5


def field_texts(records: Sequence[Record]) -> dict[str, list[str]]:
    """The text of each field the records use: prompt/context/response for pairs, and system, user
    (with their passages as context) and assistant turns for conversations."""
    fields: dict[str, list[str]] = {}

    def add(name: str, text: str) -> None:
        text = text.replace(EOS_TEXT, "")  # one token, not 13 characters of text
        if text:
            fields.setdefault(name, []).append(text)

    for r in records:
        if not r.is_conversation:
            add("prompt", r.prompt)
            add("context", r.context)
            add("response", r.response)
            continue
        for m in r.messages:
            add({"user": "user turns", "assistant": "assistant turns"}.get(m.role, m.role), m.content)
            add("context", m.context)
    return fields


def token_cost(records: Sequence[Record], tokenizer) -> dict[str, dict]:
    """{field: {texts, chars, tokens, chars_per_token, far_more_than_english}}, each text tokenized
    on its own (so template text does not dilute a field's cost)."""
    out = {}
    for name, texts in field_texts(records).items():
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        chars, tokens = sum(map(len, texts)), sum(map(len, ids))
        cpt = chars / tokens if tokens else None
        out[name] = {
            "texts": len(texts),
            "chars": chars,
            "tokens": tokens,
            "chars_per_token": cpt,
            "far_more_than_english": cpt is not None and cpt < COSTLY_BELOW,
        }
    return out


def costly(cost: dict[str, dict]) -> dict[str, float]:
    """{field: chars per token} of the fields that cost far more tokens than English text."""
    return {name: c["chars_per_token"] for name, c in cost.items() if c["far_more_than_english"]}


def cost_warning(cost: dict[str, dict]) -> str | None:
    """One line naming the fields under COSTLY_BELOW characters per token, or None."""
    high = costly(cost)
    if not high:
        return None
    fields = ", ".join(f"{name} {cpt:.2f}" for name, cpt in high.items())
    times = ENGLISH_CHARS_PER_TOKEN / min(high.values())
    return (
        f"text costs far more tokens than English with this tokenizer: characters per token {fields}, "
        f"against ~{ENGLISH_CHARS_PER_TOKEN} for English (up to {times:.1f}x the tokens for the same length); "
        "max_len holds that much less of it (see the truncation table; a tokenizer trained on this language "
        "would fit more)"
    )
