"""Records -> token ids and labels, before any truncation.

The rule that makes masking exact: every segment (rendered prompt, response, each turn) is
tokenized on its own and the ids are concatenated. Searching for the template's tokens in the
tokenized whole would break at BPE boundaries: GPT-2 tokenizes "Answer: " as [Answer, :, " "], but
"Answer: Paris" as [Answer, :, " Paris"], so the prompt's last token never appears in the joined text.

EOS: the literal text `<|endoftext|>` anywhere in the data becomes the EOS id (never its 7 character
tokens). A response that already ends with the literal text (t0 completions all do) has it removed
before the real EOS is appended, so every response ends with exactly one EOS, and it is in the loss.

The model's own chat template (`template: model`) is the exception to segment-by-segment: there
the whole rendered conversation is tokenized at once, as `apply_chat_template` tokenizes it, and
the labels are the tokens that overlap the template's assistant spans (`model_template`), so the
ids are apply_chat_template's token for token. The template writes its own end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qatune.data.example import EOS_TEXT, IGNORE
from qatune.data.model_template import ModelTemplate
from qatune.data.records import DataError, Message, Record
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
    template: Template | ModelTemplate,
    tokenizer,
    train_on_turns: str = "all",
    chunk_size: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> list[Encoding]:
    """Encode all records with batched fast tokenization; `progress(n)` is called after each chunk."""
    if train_on_turns not in TURNS:
        raise UserError(f"train_on_turns must be one of {', '.join(TURNS)}, got {train_on_turns!r}")
    if isinstance(template, ModelTemplate):
        return encode_chat_records(records, template.bind(tokenizer), tokenizer, train_on_turns, chunk_size, progress)
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


def record_messages(record: Record) -> list[Message]:
    """A record as a conversation, answers without a literal end-of-text (the template writes its
    own end of turn)."""
    if record.is_conversation:
        messages = record.messages
    else:
        messages = [Message("user", record.prompt, record.context), Message("assistant", record.response)]
    return [Message(m.role, strip_final_eos(m.content), m.context) if m.role == "assistant" else m for m in messages]


def chat_spans(record: Record, template: ModelTemplate, train_on_turns: str) -> tuple[str, list[tuple[int, int]]]:
    """The record rendered by the chat template, and the character spans that carry loss."""
    text, spans = template.render_with_spans(template.chat(record_messages(record)), record.where)
    if not spans:
        raise DataError(f"{record.where}: the chat template{template.of_source()} renders no assistant turn")
    return text, spans if train_on_turns == "all" else spans[-1:]


def span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Labels: a token's id where it overlaps a span (the rule of transformers' assistant mask, so
    a token that straddles a span's edge is trained), IGNORE elsewhere; and the first token of the
    last span (where "the response" starts, for truncation)."""
    labels = [IGNORE] * len(ids)
    start = len(ids)
    k = 0
    for i, (a, b) in enumerate(offsets):
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if b > spans[k][0]:
            labels[i] = ids[i]
            if k == len(spans) - 1:
                start = min(start, i)
    return labels, start


def encode_chat_records(
    records: Sequence[Record],
    template: ModelTemplate,
    tokenizer,
    train_on_turns: str,
    chunk_size: int,
    progress: Callable[[int], None] | None,
) -> list[Encoding]:
    """Each record's whole rendered text tokenized at once (no special tokens added: the template
    writes BOS itself, as apply_chat_template tokenizes), labels from the assistant spans."""
    out: list[Encoding] = []
    for start in range(0, len(records), chunk_size):
        chunk = records[start : start + chunk_size]
        rendered = [chat_spans(r, template, train_on_turns) for r in chunk]
        tokens = tokenizer(
            [text for text, _ in rendered],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        for record, (_, spans), ids, offsets in zip(chunk, rendered, tokens["input_ids"], tokens["offset_mapping"]):
            labels, response_start = span_labels(list(ids), offsets, spans)
            out.append(Encoding(list(ids), labels, response_start, record.source, record.where))
        if progress:
            progress(len(chunk))
    return out


def generation_ids(template: Template | ModelTemplate, messages: list[Message], tokenizer) -> list[int]:
    """The ids a model continues from for a history that ends in a user turn, encoded as training
    encoded the history: qatune's templates segment by segment (`encode_pieces`), the model's own
    chat template whole, = apply_chat_template(history, add_generation_prompt=True)."""
    if isinstance(template, ModelTemplate):
        text = template.bind(tokenizer).generation_prompt(messages)
        return list(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"])
    return encode_pieces(template.generation_pieces(messages), tokenizer)


def stop_ids(template: Template | ModelTemplate, tokenizer) -> list[int]:
    """The ids that end an answer: EOS, and the end-of-turn token the model's chat template writes
    after each answer (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`), which is what a model trained
    on that template writes when it is done."""
    ids = [tokenizer.eos_token_id]
    if isinstance(template, ModelTemplate):
        end = template.bind(tokenizer).end_of_turn().strip()
        end_ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
        if len(end_ids) == 1 and end_ids[0] not in ids:
            ids.append(end_ids[0])
    return ids


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
