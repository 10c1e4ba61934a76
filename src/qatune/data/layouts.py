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
MAPPING_KEYS = ("prompt", "response", "context", "messages")
# Fields each layout reads; a row's other non-empty text fields are reported, never dropped unseen.
USED_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "self_instruct": ("instruction", "instances"),
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
    "prompt_completion": ("prompt", "completion"),
    "prompt_response": ("prompt", "response"),
    "squad": ("question", "answers", "context"),
    "context_question_answer": ("context", "question", "answer"),
    "question_answer": ("question", "answer"),
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
    if "messages" not in mapping and not {"prompt", "response"} <= set(mapping):
        raise DataError('a mapping needs "prompt" and "response" (or "messages")')


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


def _pair(prompt: str, response: str, context: str | None = None) -> Callable[[dict, str, str], list[Record]]:
    def convert(row: dict, source: str, where: str) -> list[Record]:
        return [
            Record(
                source,
                where,
                prompt=text_field(row, prompt, where),
                response=text_field(row, response, where),
                context=text_field(row, context, where, required=False) if context else "",
            )
        ]

    return convert


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
    return [Record(source, where, prompt=prompt, response=answers[0], context=context, references=answers)]


def _messages(field_name: str) -> Callable[[dict, str, str], list[Record]]:
    def convert(row: dict, source: str, where: str) -> list[Record]:
        turns = row.get(field_name)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field {field_name!r} must be a non-empty list of {{role, content}}")
        messages = []
        for i, turn in enumerate(turns):
            at = f"{field_name}[{i}]"
            if not isinstance(turn, dict):
                raise DataError(f"{where}: field {at!r} must be an object with role and content")
            role = turn.get("role")
            if role not in ROLES:
                raise DataError(f"{where}: field {at + '.role'!r} is {role!r}, not one of {', '.join(ROLES)}")
            messages.append(Message(role, text_field(turn, "content", f"{where}: {at}")))
        if not any(m.role == "assistant" for m in messages):
            raise DataError(f"{where}: field {field_name!r} has no assistant turn to train on")
        return [Record(source, where, messages=messages)]

    return convert


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
        return _messages(mapping["messages"])
    return _pair(mapping["prompt"], mapping["response"], mapping.get("context"))


def fields_used(layout: str, mapping: dict[str, str] | None) -> tuple[str, ...]:
    return tuple(mapping.values()) if layout == "mapping" else USED_FIELDS[layout]


def unused_text_fields(row: dict, used: tuple[str, ...]) -> list[str]:
    """Fields of `row` that hold non-empty text but that the layout does not read (identifiers
    such as id, title or category excepted)."""
    return [
        k
        for k, v in row.items()
        if k not in used
        and isinstance(v, str)
        and v.strip()
        and k.lower() not in METADATA_FIELDS
        and not k.lower().endswith("_id")
    ]


def unused_field_warning(source: str, field: str, count: int, rows: int, layout: str, mapping) -> str:
    if layout == "mapping":
        described = "the mapping (" + " ".join(f"{k}={v}" for k, v in mapping.items()) + ")"
        pair = {k: v for k, v in mapping.items() if k != "messages"} if "messages" not in mapping else None
    else:
        described = f"layout {layout} ({', '.join(dict(LAYOUTS)[layout])})"
        fields = USED_FIELDS[layout]
        pair = {"prompt": fields[0], "response": fields[1]} if len(fields) == 2 and layout != "messages" else None
    text = f"{source}: field {field!r} holds text in {count} of {rows} records, but {described} does not use it"
    if pair is not None and "context" not in pair:
        suggestion = " ".join(f"{k}={v}" for k, v in {**pair, "context": field}.items())
        return f"{text}; to use it, give a mapping: {suggestion}"
    return f"{text}; give a field mapping to use it"


def to_records(row, layout: str, mapping: dict[str, str] | None, source: str, where: str) -> list[Record]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be an object with fields, got {type(row).__name__}")
    return converter_for(layout, mapping)(row, source, where)
