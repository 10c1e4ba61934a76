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
    ("question_answer", ("question", "answer")),
]
MAPPING_KEYS = ("prompt", "response", "context", "messages")


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
    "question_answer": _pair("question", "answer"),
}


def converter_for(layout: str, mapping: dict[str, str] | None) -> Callable[[dict, str, str], list[Record]]:
    if layout != "mapping":
        return CONVERTERS[layout]
    if "messages" in mapping:
        return _messages(mapping["messages"])
    return _pair(mapping["prompt"], mapping["response"], mapping.get("context"))


def to_records(row, layout: str, mapping: dict[str, str] | None, source: str, where: str) -> list[Record]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be an object with fields, got {type(row).__name__}")
    return converter_for(layout, mapping)(row, source, where)
