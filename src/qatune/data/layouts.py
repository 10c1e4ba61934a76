"""Record layouts: which fields of a row hold the prompt, the response, the context or the messages.

A layout is detected once per source from the fields of its first row (`detect_layout`), then every
row of that source is converted with it, so a row that lacks a field is an error naming that field
rather than a silent switch to another layout. An explicit mapping replaces detection.
"""

from __future__ import annotations

from collections.abc import Callable

from qatune.data.records import ROLES, DataError, Message, Record

# (layout name, fields that identify it). Checked in order: the first whose fields are all present wins.
LAYOUTS: list[tuple[str, tuple[str, ...]]] = [
    ("messages", ("messages",)),
    # ShareGPT: {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}], "system": ...}
    ("sharegpt", ("conversations",)),
    ("self_instruct", ("instruction", "instances")),
    ("alpaca", ("instruction", "output")),
    ("dolly", ("instruction", "response")),
    ("prompt_completion", ("prompt", "completion")),
    ("prompt_response", ("prompt", "response")),
    # Reading comprehension: the passage goes into the prompt as its context. `answers` holds every
    # accepted answer (a list, or SQuAD's {"text": [...], "answer_start": [...]}); the first is
    # trained on, all of them are references for evaluation.
    ("squad", ("question", "answers")),
    ("context_question_answer", ("context", "question", "answer")),
    ("question_answer", ("question", "answer")),
]
# Row fields a mapping can name (prompt, response, context, system, history; or messages and system),
# and, for messages, the keys of each turn that hold its role and its text (role=from content=value).
MAPPING_KEYS = ("prompt", "response", "context", "system", "history", "messages", "role", "content")
TURN_KEYS = ("role", "content")
# A record's earlier turns and system prompt. Every pair layout reads them (a record with either
# becomes a conversation), so LLaMA-Factory's Alpaca {"instruction", "input", "output", "system",
# "history": [[instruction, response], ...]} trains on what it says.
CHAT_FIELDS = ("system", "history")
# Fields each layout reads; a row's other non-empty fields are reported, never dropped unseen.
USED_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "system"),
    "sharegpt": ("conversations", "system"),
    "self_instruct": ("instruction", "instances"),
    "alpaca": ("instruction", "output", "input", *CHAT_FIELDS),
    "dolly": ("instruction", "response", "context", *CHAT_FIELDS),
    "prompt_completion": ("prompt", "completion", *CHAT_FIELDS),
    "prompt_response": ("prompt", "response", *CHAT_FIELDS),
    "squad": ("question", "answers", "context", *CHAT_FIELDS),
    "context_question_answer": ("question", "answer", "context", *CHAT_FIELDS),
    "question_answer": ("question", "answer", *CHAT_FIELDS),
}
# Fields whose meaning is certain and changes what the model is trained on: one that holds data a
# layout does not read is an error, not a warning, since training without it is a different run
# (a system prompt the model never sees, earlier turns it never answers, tool definitions it never
# reads). Unknown extra fields stay warnings: they are as often bookkeeping (scores, tags) as text.
MEANINGFUL_FIELDS = {
    "system": "a system prompt",
    "history": "earlier turns",
    "messages": "a conversation",
    "conversations": "a conversation",
    "tools": "tool definitions, which no template renders",
}
# Role names as data sets spell them: OpenAI's messages, ShareGPT's human/gpt, and common variants.
ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",  # Gemini's name for the assistant
}
# Identifiers and labels that say where a record came from, not what it asks or answers.
METADATA_FIELDS = frozenset(
    ("id", "idx", "uid", "name", "title", "category", "source", "url", "license", "lang", "language", "split", "task")
)


def detect_layout(row: dict, where: str, mapping: dict[str, str] | None = None) -> str:
    if mapping:
        check_mapping(mapping)
        return "mapping"
    for name, fields in LAYOUTS:
        if all(f in row for f in fields):
            return name
    known = "; ".join(f"{name} ({', '.join(fields)})" for name, fields in LAYOUTS)
    raise DataError(
        f"{where}: unknown layout: fields {sorted(row)} match none of: {known}. "
        'Give a field mapping, e.g. mapping={"prompt": "q", "response": "a"}'
    )


def check_mapping(mapping: dict[str, str]) -> None:
    unknown = [k for k in mapping if k not in MAPPING_KEYS]
    if unknown:
        raise DataError(f"mapping key {unknown[0]!r} is not one of {', '.join(MAPPING_KEYS)}")
    if "messages" in mapping:
        pair_keys = [k for k in ("prompt", "response", "context", "history") if k in mapping]
        if pair_keys:
            raise DataError(f'mapping key {pair_keys[0]!r} does not go with "messages" (the turns hold the text)')
        return
    if not {"prompt", "response"} <= set(mapping):
        raise DataError('a mapping needs "prompt" and "response" (or "messages")')
    turn_keys = [k for k in TURN_KEYS if k in mapping]
    if turn_keys:
        raise DataError(f'mapping key {turn_keys[0]!r} names a key of each turn: it goes with "messages"')


def text_field(row: dict, name: str, where: str, required: bool = True) -> str:
    """The string in row[name]; missing, non-string or (when required) empty values are errors."""
    if name not in row or row[name] is None:
        if required:
            raise DataError(f"{where}: field {name!r} is missing")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _pair(
    prompt: str,
    response: str,
    context: str | None = None,
    system: str | None = "system",
    history: str | None = "history",
) -> Callable[[dict, str, str], list[Record]]:
    def convert(row: dict, source: str, where: str) -> list[Record]:
        record = Record(
            source,
            where,
            prompt=text_field(row, prompt, where),
            response=text_field(row, response, where),
            context=text_field(row, context, where, required=False) if context else "",
        )
        return [with_turns(record, row, where, system, history)]

    return convert


def with_turns(record: Record, row: dict, where: str, system: str | None, history: str | None) -> Record:
    """The record as a conversation when the row brings a system prompt or earlier turns:
    system, then each [instruction, response] of the history, then the record's own turn (its
    context kept with it); else the record unchanged."""
    system_text = text_field(row, system, where, required=False) if system else ""
    earlier = history_turns(row, history, where) if history else []
    if not system_text.strip() and not earlier:
        return record
    messages = [Message("system", system_text)] if system_text.strip() else []
    messages += [*earlier, Message("user", record.prompt, record.context), Message("assistant", record.response)]
    return Record(record.source, where, messages=messages, references=record.references, extra=record.extra)


def history_turns(row: dict, name: str, where: str) -> list[Message]:
    """Alpaca-style history: [[instruction, response], ...], oldest first."""
    value = row.get(name)
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise DataError(f"{where}: field {name!r} must be a list of [instruction, response] pairs")
    turns = []
    for i, pair in enumerate(value):
        at = f"{name}[{i}]"
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"{where}: field {at!r} must be an [instruction, response] pair")
        for j, role in enumerate(("user", "assistant")):
            text = pair[j]
            if not isinstance(text, str) or not text.strip():
                what = "empty" if isinstance(text, str) else f"a {type(text).__name__}, not a string"
                raise DataError(f"{where}: field {f'{at}[{j}]'!r} is {what}")
            turns.append(Message(role, text))
    return turns


def answer_list(row: dict, name: str, where: str) -> list[str]:
    """The accepted answers in row[name]: a list of strings, a list of {"text": ...} objects, or
    SQuAD's {"text": [...], "answer_start": [...]}; duplicates kept once, in order."""
    value = row.get(name)
    if isinstance(value, dict):
        value = value.get("text")
    if not isinstance(value, list):
        raise DataError(
            f'{where}: field {name!r} must be a list of strings or {{"text": [...], "answer_start": [...]}}'
        )
    if not value:
        raise DataError(f"{where}: field {name!r} is empty (an unanswerable question? it has nothing to train on)")
    answers: list[str] = []
    for i, item in enumerate(value):
        text = item.get("text") if isinstance(item, dict) else item
        at = f"{name}[{i}]"
        if not isinstance(text, str):
            raise DataError(f"{where}: field {at!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{where}: field {at!r} is empty")
        if text not in answers:
            answers.append(text)
    return answers


def _squad(row: dict, source: str, where: str) -> list[Record]:
    answers = answer_list(row, "answers", where)
    prompt = text_field(row, "question", where)
    context = text_field(row, "context", where, required=False)
    record = Record(source, where, prompt=prompt, response=answers[0], context=context, references=answers)
    return [with_turns(record, row, where, "system", "history")]


def turn_keys(first, role_key: str | None, content_key: str | None) -> tuple[str, str]:
    """The keys of a turn's role and text: the mapping's, else role/content (OpenAI) or from/value
    (ShareGPT), whichever the first turn uses."""
    if role_key or content_key:
        return role_key or "role", content_key or "content"
    if isinstance(first, dict) and "role" not in first and ("from" in first or "value" in first):
        return "from", "value"
    return "role", "content"


def _messages(
    field_name: str, role_key: str | None = None, content_key: str | None = None, system: str | None = "system"
) -> Callable[[dict, str, str], list[Record]]:
    def convert(row: dict, source: str, where: str) -> list[Record]:
        turns = row.get(field_name)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field {field_name!r} must be a non-empty list of {{role, content}}")
        rk, ck = turn_keys(turns[0], role_key, content_key)
        system_text = text_field(row, system, where, required=False) if system else ""
        messages = [Message("system", system_text)] if system_text.strip() else []
        for i, turn in enumerate(turns):
            at = f"{field_name}[{i}]"
            if not isinstance(turn, dict):
                raise DataError(f"{where}: field {at!r} must be an object with {rk} and {ck}")
            name = turn.get(rk)
            role = ROLE_NAMES.get(name.lower()) if isinstance(name, str) else None
            if role is None:
                raise DataError(
                    f"{where}: field {f'{at}.{rk}'!r} is {name!r}, not one of {', '.join(ROLES)} "
                    "(or ShareGPT's human, gpt, chatgpt; Gemini's model)"
                )
            messages.append(Message(role, text_field(turn, ck, f"{where}: {at}")))
        check_turns(messages, field_name, where, system if system_text.strip() else None)
        return [Record(source, where, messages=messages)]

    return convert


def check_turns(messages: list[Message], field_name: str, where: str, system_field: str | None) -> None:
    """One system prompt, first: the template writes it once, before the first user turn, so a
    second one (or one given both as a field and as a turn) would be dropped or moved."""
    systems = [i for i, m in enumerate(messages) if m.role == "system"]
    if len(systems) > 1:
        both = f"field {system_field!r} and a system turn" if system_field else f"{len(systems)} system turns"
        raise DataError(f"{where}: field {field_name!r}: {both}; a conversation has one system prompt, first")
    if systems and systems[0] != 0:
        raise DataError(f"{where}: field {field_name!r}: the system turn must come first")
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: field {field_name!r} has no assistant turn to train on")


def _self_instruct(row: dict, source: str, where: str) -> list[Record]:
    instruction = text_field(row, "instruction", where)
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise DataError(f"{where}: field 'instances' must be a non-empty list of {{input, output}}")
    out = []
    for i, inst in enumerate(instances):
        at = f"{where}: instances[{i}]"
        if not isinstance(inst, dict):
            raise DataError(f"{at}: must be an object with input and output")
        out.append(
            Record(
                source,
                f"{where}:instances[{i}]",
                prompt=instruction,
                response=text_field(inst, "output", at),
                context=text_field(inst, "input", at, required=False),
            )
        )
    return out


CONVERTERS: dict[str, Callable[[dict, str, str], list[Record]]] = {
    "messages": _messages("messages"),
    "sharegpt": _messages("conversations"),
    "self_instruct": _self_instruct,
    "alpaca": _pair("instruction", "output", "input"),
    "dolly": _pair("instruction", "response", "context"),
    "prompt_completion": _pair("prompt", "completion"),
    "prompt_response": _pair("prompt", "response"),
    "squad": _squad,
    "context_question_answer": _pair("question", "answer", "context"),
    "question_answer": _pair("question", "answer"),
}


def converter_for(layout: str, mapping: dict[str, str] | None) -> Callable[[dict, str, str], list[Record]]:
    if layout != "mapping":
        return CONVERTERS[layout]
    if "messages" in mapping:
        return _messages(mapping["messages"], mapping.get("role"), mapping.get("content"), mapping.get("system"))
    m = mapping
    return _pair(m["prompt"], m["response"], m.get("context"), m.get("system"), m.get("history"))


def fields_used(layout: str, mapping: dict[str, str] | None) -> tuple[str, ...]:
    """The row fields a layout or mapping reads (a mapping's role/content name keys of each turn)."""
    if layout == "mapping":
        return tuple(v for k, v in mapping.items() if k not in TURN_KEYS)
    return USED_FIELDS[layout]


def holds_data(value) -> bool:
    """Text, or a list/object of it: what a reader could mean to train on (numbers and flags are labels)."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, (list, dict)) and bool(value)


def unused_text_fields(row: dict, used: tuple[str, ...]) -> list[str]:
    """Fields of `row` that hold text (or lists/objects) but that the layout does not read
    (identifiers such as id, title or category excepted)."""
    return [
        k
        for k, v in row.items()
        if k not in used and holds_data(v) and k.lower() not in METADATA_FIELDS and not k.lower().endswith("_id")
    ]


def check_meaningful_fields(row: dict, used: tuple[str, ...], layout: str, mapping, where: str) -> None:
    """A system prompt, history, conversation or tool list the layout does not read is an error."""
    for name, what in MEANINGFUL_FIELDS.items():
        if name in row and name not in used and holds_data(row[name]):
            unused = f"field {name!r} holds {what}, but {describe(layout, mapping)} does not use it"
            raise DataError(f"{where}: {unused}; {how_to_use(name, layout, mapping)}")


def how_to_use(name: str, layout: str, mapping) -> str:
    """A mapping can name a system field (any mapping) or a history field (a pair mapping) it left out."""
    can_map = name == "system" or (name == "history" and "messages" not in (mapping or {}))
    if layout == "mapping" and can_map and name not in mapping:
        return f"add {name}={name} to the mapping"
    return "remove the field, or give a mapping that reads it"


def describe(layout: str, mapping) -> str:
    if layout == "mapping":
        return "the mapping (" + " ".join(f"{k}={v}" for k, v in mapping.items()) + ")"
    return f"layout {layout} ({', '.join(dict(LAYOUTS)[layout])})"


def unused_field_warning(source: str, field: str, count: int, rows: int, layout: str, mapping) -> str:
    described = describe(layout, mapping)
    if layout == "mapping":
        pair = {k: v for k, v in mapping.items() if k != "messages"} if "messages" not in mapping else None
    else:
        fields = [f for f in USED_FIELDS[layout] if f not in CHAT_FIELDS]
        pair = {"prompt": fields[0], "response": fields[1]} if len(fields) == 2 and "messages" not in layout else None
    text = f"{source}: field {field!r} holds text in {count} of {rows} records, but {described} does not use it"
    if pair is not None and "context" not in pair:
        suggestion = " ".join(f"{k}={v}" for k, v in {**pair, "context": field}.items())
        return f"{text}; to use it, give a mapping: {suggestion}"
    return f"{text}; give a field mapping to use it"


def to_records(row, layout: str, mapping: dict[str, str] | None, source: str, where: str) -> list[Record]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be an object with fields, got {type(row).__name__}")
    check_meaningful_fields(row, fields_used(layout, mapping), layout, mapping, where)
    return converter_for(layout, mapping)(row, source, where)
