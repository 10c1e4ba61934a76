"""Records -> token ids and labels, before any truncation.

The rule that makes masking exact: every segment (rendered prompt, response, each turn) is
tokenized on its own and the ids are concatenated. Searching for the template's tokens in the
tokenized whole would break at BPE boundaries: GPT-2 tokenizes "Answer: " as [Answer, :, " "], but
"Answer: Paris" as [Answer, :, " Paris"], so the prompt's last token never appears in the joined text.

EOS: the literal text `<|endoftext|>` anywhere in the data becomes the EOS id (never its 7 character
tokens). A response that already ends with the literal text (t0 completions all do) has it removed
before the real EOS is appended, so every response ends with exactly one EOS, and it is in the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qatune.data.example import EOS_TEXT, IGNORE
from qatune.data.records import Record
from qatune.data.templates import Template
from qatune.errors import UserError

TURNS = ("all", "last")


@dataclass
class Encoding:
    """One example as ids and labels, untruncated. `response_start` is where the last trained
    segment (the final answer) begins: everything before it is "the prompt" for truncation."""

    input_ids: list[int]
    labels: list[int]
    response_start: int
    source: str
    where: str

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def segments(record: Record, template: Template, train_on_turns: str = "all") -> list[tuple[str, bool, bool]]:
    """(text, is_answer, trainable) for one record. Answers get EOS appended whether trained or not,
    so a conversation reads the same as at generation time."""
    if not record.is_conversation:
        prompt = template.render_prompt(record.prompt, record.context)
        return [(prompt, False, False), (template.render_response(record.response), True, True)]
    parts = template.render_conversation(record.messages)
    last_answer = max(i for i, (_, answer) in enumerate(parts) if answer)
    trained = lambda i, answer: answer and (train_on_turns == "all" or i == last_answer)
    return [(text, answer, trained(i, answer)) for i, (text, answer) in enumerate(parts)]


def strip_final_eos(text: str) -> str:
    stripped = text.rstrip()
    return stripped[: -len(EOS_TEXT)] if stripped.endswith(EOS_TEXT) else text


def encode_records(
    records: Sequence[Record],
    template: Template,
    tokenizer,
    train_on_turns: str = "all",
    chunk_size: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> list[Encoding]:
    """Encode all records with batched fast tokenization; `progress(n)` is called after each chunk."""
    if train_on_turns not in TURNS:
        raise UserError(f"train_on_turns must be one of {', '.join(TURNS)}, got {train_on_turns!r}")
    eos = tokenizer.eos_token_id
    out: list[Encoding] = []
    for start in range(0, len(records), chunk_size):
        chunk = records[start : start + chunk_size]
        segs = [segments(r, template, train_on_turns) for r in chunk]
        texts = [strip_final_eos(t) if answer else t for s in segs for t, answer, _ in s]
        ids = tokenize_with_eos(texts, tokenizer)
        k = 0
        for record, s in zip(chunk, segs):
            input_ids: list[int] = []
            labels: list[int] = []
            response_start = 0
            for _, answer, trainable in s:
                seg_ids = ids[k] + [eos] if answer else ids[k]
                k += 1
                if trainable:
                    response_start = len(input_ids)
                input_ids += seg_ids
                labels += seg_ids if trainable else [IGNORE] * len(seg_ids)
            out.append(Encoding(input_ids, labels, response_start, record.source, record.where))
        if progress:
            progress(len(chunk))
    return out


def encode_pieces(pieces: list[str], tokenizer) -> list[int]:
    """Ids of text segments tokenized apart and concatenated, as training encodes a conversation:
    what a chat history or an exported chat template must reproduce."""
    return [i for ids in tokenize_with_eos(pieces, tokenizer) for i in ids]


def tokenize_with_eos(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each text, in one batched call, with every literal EOS text mapped to the EOS id."""
    pieces: list[str] = []
    counts: list[int] = []
    for t in texts:
        parts = t.split(EOS_TEXT)
        pieces += parts
        counts.append(len(parts))
    piece_ids = tokenizer(pieces, add_special_tokens=False, return_attention_mask=False)["input_ids"] if pieces else []
    eos = tokenizer.eos_token_id
    out = []
    k = 0
    for c in counts:
        ids = list(piece_ids[k])
        for extra in piece_ids[k + 1 : k + c]:
            ids += [eos, *extra]
        out.append(ids)
        k += c
    return out
