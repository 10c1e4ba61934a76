"""Preference pairs: one prompt, a chosen and a rejected response, still as text.

Layouts, detected once per source from its first row (or replaced by a field mapping):

- explicit:      {"prompt": str, "chosen": str, "rejected": str}
- conversational (TRL's format): {"prompt": [messages ending in a user turn],
                  "chosen": [one assistant message], "rejected": [one assistant message]}
- implicit:      {"chosen": str, "rejected": str}, whole `\\n\\nHuman: … \\n\\nAssistant: …`
                  dialogues (Anthropic HH-RLHF) sharing everything up to the last assistant turn
- implicit_conversational: {"chosen": [messages], "rejected": [messages]} sharing all but the
                  last (assistant) message

An optional numeric `margin` (how much better chosen is) is kept for the reward model's loss.
Implicit dialogues become messages, so the run's template renders every prompt the same way (the
way `qatune chat` prompts the model afterwards). A pair whose two dialogues differ before the last
assistant turn has no shared prompt: an error naming the line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from qatune.data.layouts import text_field
from qatune.data.readers import MAX_REASONS, display_name, expand_sources, iter_rows
from qatune.data.records import ROLES, DataError, Message
from qatune.data.templates import Template

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
PAIR_MAPPING_KEYS = ("prompt", "chosen", "rejected", "margin")


@dataclass
class PreferenceRecord:
    source: str
    where: str  # file:line, as for SFT records
    chosen: str
    rejected: str
    prompt: str = ""  # explicit prompt text (rendered with the template's prompt format)
    messages: list[Message] | None = None  # a conversation ending in a user turn, instead of `prompt`
    margin: float | None = None

    def prompt_text(self, template: Template) -> str:
        """The text the responses follow, rendered by the run's template."""
        if self.messages is not None:
            return template.generation_prompt(self.messages)
        return template.render_prompt(self.prompt)


def is_preference_row(row: object) -> bool:
    return isinstance(row, dict) and "chosen" in row and "rejected" in row


def detect_pair_layout(row: dict, where: str, mapping: dict[str, str] | None = None) -> str:
    if mapping:
        check_pair_mapping(mapping)
        return "mapping"
    if not is_preference_row(row):
        raise DataError(
            f"{where}: not preference data: fields {sorted(row)} lack 'chosen' and 'rejected'. "
            'Give a field mapping, e.g. mapping={"prompt": "q", "chosen": "good", "rejected": "bad"}'
        )
    if "prompt" in row:
        return "conversational" if isinstance(row["prompt"], list) else "explicit"
    return "implicit_conversational" if isinstance(row["chosen"], list) else "implicit"


def check_pair_mapping(mapping: dict[str, str]) -> None:
    unknown = [k for k in mapping if k not in PAIR_MAPPING_KEYS]
    if unknown:
        raise DataError(f"mapping key {unknown[0]!r} is not one of {', '.join(PAIR_MAPPING_KEYS)}")
    if not {"chosen", "rejected"} <= set(mapping):
        raise DataError('a preference mapping needs "chosen" and "rejected" (and "prompt" unless it is implicit)')


def to_pair(row, layout: str, mapping: dict[str, str] | None, source: str, where: str) -> PreferenceRecord:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be an object with fields, got {type(row).__name__}")
    names = dict(mapping) if layout == "mapping" else {}
    name = lambda key: names.get(key, key)  # the user's field name, for error messages
    if layout == "mapping":
        row = {key: row.get(field_name) for key, field_name in mapping.items()}
        layout = _mapped_layout(row, mapping)
    margin = _margin(row, name("margin"), where)
    if layout == "explicit":
        prompt = text_field({name("prompt"): row.get("prompt")}, name("prompt"), where)
        chosen, rejected = (_response(row.get(k), name(k), where) for k in ("chosen", "rejected"))
        return PreferenceRecord(source, where, chosen, rejected, prompt=prompt, margin=margin)
    if layout == "conversational":
        messages = _messages(row.get("prompt"), name("prompt"), where)
        if messages[-1].role != "user":
            raise DataError(f"{where}: field {name('prompt')!r} must end with a user turn")
        chosen, rejected = (_one_answer(row.get(k), name(k), where) for k in ("chosen", "rejected"))
        return PreferenceRecord(source, where, chosen, rejected, messages=messages, margin=margin)
    if layout == "implicit":
        return _split_dialogues(row, name, source, where, margin)
    if layout == "implicit_conversational":
        return _split_conversations(row, name, source, where, margin)
    raise DataError(f"{where}: unknown preference layout {layout!r}")


def _mapped_layout(row: dict, mapping: dict[str, str]) -> str:
    if "prompt" in mapping:
        return "conversational" if isinstance(row.get("prompt"), list) else "explicit"
    return "implicit_conversational" if isinstance(row.get("chosen"), list) else "implicit"


def _response(value, field_name: str, where: str) -> str:
    return text_field({field_name: value}, field_name, where)


def _margin(row: dict, field_name: str, where: str) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field {field_name!r} must be a finite number, got {value!r}")
    return float(value)


def _messages(value, field_name: str, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field_name!r} must be a non-empty list of {{role, content}}")
    out = []
    for i, turn in enumerate(value):
        at = f"{field_name}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field {at!r} must be an object with role and content")
        if turn.get("role") not in ROLES:
            raise DataError(f"{where}: field {at + '.role'!r} is {turn.get('role')!r}, not one of {', '.join(ROLES)}")
        out.append(Message(turn["role"], text_field(turn, "content", f"{where}: {at}")))
    return out


def _one_answer(value, field_name: str, where: str) -> str:
    messages = _messages(value, field_name, where)
    if len(messages) != 1 or messages[0].role != "assistant":
        raise DataError(f"{where}: field {field_name!r} must hold exactly one assistant message")
    return messages[0].content


def _split_dialogues(row: dict, name, source: str, where: str, margin) -> PreferenceRecord:
    """HH-RLHF: the prompt is everything up to and including the last `\\n\\nAssistant:`."""
    parts = {}
    for key in ("chosen", "rejected"):
        text = text_field({name(key): row.get(key)}, name(key), where)
        cut = text.rfind(ASSISTANT)
        if cut < 0:
            raise DataError(f"{where}: field {name(key)!r} has no {ASSISTANT.strip()!r} turn to split the prompt at")
        parts[key] = (text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT) :].strip())
    (prompt, chosen), (other, rejected) = parts["chosen"], parts["rejected"]
    if prompt != other:
        at = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
        raise DataError(
            f"{where}: fields {name('chosen')!r} and {name('rejected')!r} differ before their last assistant turn "
            f"(at character {at}), so they share no prompt"
        )
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text:
            raise DataError(f"{where}: field {name(key)!r} has an empty response after its last assistant turn")
    return PreferenceRecord(source, where, chosen, rejected, messages=dialogue_messages(prompt, where), margin=margin)


def dialogue_messages(text: str, where: str) -> list[Message]:
    """`\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:` -> user a, assistant b, user c."""
    pieces = re.split(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})", text)
    if pieces[0].strip():
        raise DataError(f"{where}: the dialogue must start with {HUMAN.strip()!r}, got {pieces[0][:40]!r}")
    messages = []
    for marker, content in zip(pieces[1::2], pieces[2::2]):
        if content.strip():
            messages.append(Message("user" if marker == HUMAN else "assistant", content.strip()))
    if not messages or messages[-1].role != "user":
        raise DataError(f"{where}: the dialogue has no human turn before its last assistant turn")
    return messages


def _split_conversations(row: dict, name, source: str, where: str, margin) -> PreferenceRecord:
    chosen, rejected = (_messages(row.get(k), name(k), where) for k in ("chosen", "rejected"))
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1].role != "assistant":
            raise DataError(f"{where}: field {name(key)!r} must end with an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(
            f"{where}: fields {name('chosen')!r} and {name('rejected')!r} differ before their last message, "
            "so they share no prompt"
        )
    prompt = chosen[:-1]
    if not prompt or prompt[-1].role != "user":
        raise DataError(f"{where}: field {name('chosen')!r} has no user turn before its last message")
    return PreferenceRecord(source, where, chosen[-1].content, rejected[-1].content, messages=prompt, margin=margin)


@dataclass
class PairReadResult:
    pairs: list[PreferenceRecord] = field(default_factory=list)
    layouts: dict[str, str] = field(default_factory=dict)
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[PreferenceRecord]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def skip(self, error: DataError) -> None:
        self.skipped += 1
        if len(self.skip_reasons) < MAX_REASONS:
            self.skip_reasons.append(str(error))


def read_pairs(
    sources: list[str] | str,
    mapping: dict[str, str] | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
) -> PairReadResult:
    """All preference pairs of all sources, in order (the SFT readers' files, formats and errors)."""
    result = PairReadResult()
    for source in expand_sources([sources] if isinstance(sources, str) else sources):
        layout = None
        for where, row in iter_rows(source):
            if limit is not None and len(result.pairs) >= limit:
                return result
            if layout is None and isinstance(row, dict):
                layout = detect_pair_layout(row, where, mapping)
                result.layouts[display_name(source)] = layout
            try:
                if isinstance(row, DataError):
                    raise row
                result.pairs.append(to_pair(row, layout, mapping, display_name(source), where))
            except DataError as e:
                if not skip_bad:
                    raise
                result.skip(e)
    return result


def sniff_preference(sources: list[str]) -> bool:
    """Whether the first readable row of the first source holds a chosen/rejected pair."""
    for source in expand_sources(sources):
        for _, row in iter_rows(source):
            if isinstance(row, dict):
                return is_preference_row(row)
        return False
    return False
