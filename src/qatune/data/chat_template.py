"""A qatune template as a Jinja chat template, for `tokenizer.apply_chat_template` in transformers.
(The model's own template, `template: model`, is Jinja already and is exported as it is.)

The Jinja text renders a conversation exactly as `Template.render_conversation` /
`generation_pieces` do: the system text once at the start (the first system message, else the
template's `system_prompt`), each user turn through `prompt` (through `prompt_with_context` when the
message has a non-empty `context` key: the passage a question is about), each assistant turn through
`render_response` followed by EOS. A user turn already ends with the answer cue ("Answer:",
"### Response:\\n"), so `add_generation_prompt` adds nothing.

transformers tokenizes the rendered text as one string, qatune segment by segment; the two give
the same ids unless a BPE merge crosses a prompt/answer boundary. The shipped templates end their
prompts in ":" or a newline (and `plain`'s answers start with a space), where GPT-2's
pre-tokenizer always splits; `raw` puts the answer right after the user's text, so it is exact
when that text ends in whitespace or punctuation (t0's prompts end in a newline).
`qatune check` compares both on the user's own data.

transformers compiles chat templates with `trim_blocks` and `lstrip_blocks`, which eat newlines
next to tags; every literal is therefore a quoted Jinja string inside `{{ }}`, never template text.
"""

from __future__ import annotations

import string

from qatune.data.model_template import ModelTemplate
from qatune.data.records import DataError
from qatune.data.templates import Template

QATUNE_JINJA = "{#- qatune template "  # how every template qatune exports begins


def jinja_string(text: str) -> str:
    """A double-quoted Jinja string literal for `text`. Jinja decodes string literals with Python's
    unicode-escape, so every character that is not plain printable ASCII (and the characters that
    could read as Jinja syntax or end the literal) is written as an escape."""
    out = []
    for ch in text:
        if ch.isascii() and ch.isprintable() and ch not in '\\"{}%#':
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def format_to_jinja(fmt: str, values: dict[str, str], key: str) -> str:
    """`{{ ... }}` printing `fmt.format(**values)`, where `values` maps a field to a Jinja expression."""
    parts = []
    for literal, name, spec, conversion in string.Formatter().parse(fmt):
        if literal:
            parts.append(jinja_string(literal))
        if name is not None:
            if spec or conversion:
                raise DataError(f"template: field {key!r}: {{{name}}} with a format spec cannot be exported")
            parts.append(values[name])
    return "{{ " + " ~ ".join(parts) + " }}" if parts else ""


def to_jinja(template: Template | ModelTemplate) -> str | None:
    """The Jinja text; for the model's own chat template (`template: model`) that text itself, as
    it is (None when it was never bound to a tokenizer: then the tokenizer's own stays)."""
    if isinstance(template, ModelTemplate):
        return template.chat_template
    template.validate()
    default_system = "none" if template.system_prompt is None else jinja_string(template.system_prompt)
    prefix = jinja_string(template.response_prefix)
    system = format_to_jinja(template.system, {"system": "ns.system"}, "system")
    user = format_to_jinja(template.prompt, {"prompt": "message['content']"}, "prompt")
    passage = {"prompt": "message['content']", "context": "message['context']"}
    with_context = format_to_jinja(template.prompt_with_context, passage, "prompt_with_context")
    # A user message may carry the passage it asks about as a `context` key, as training's records
    # do (SQuAD's context, Alpaca's input): {"role": "user", "content": question, "context": passage}.
    user = f"{{%- if message.get('context') -%}}{with_context}{{%- else -%}}{user}{{%- endif -%}}"
    answer = "{{ message['content'] ~ eos_token }}"
    if template.response_prefix:
        answer = (
            "{%- if message['content'][:1].isspace() -%}" + answer + "{%- else -%}"
            "{{ " + prefix + " ~ message['content'] ~ eos_token }}{%- endif -%}"
        )
    name = "".join(ch for ch in template.name if ch.isalnum() or ch in " -_.")
    return (
        f"{QATUNE_JINJA}{name}: renders what training renders -#}}"
        f"{{%- set ns = namespace(system={default_system}, found=false) -%}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' and not ns.found -%}"
        "{%- set ns.system = message['content'] -%}{%- set ns.found = true -%}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if ns.system -%}}{system}{{%- endif -%}}"
        "{%- for message in messages -%}"
        f"{{%- if message['role'] == 'user' -%}}{user}"
        f"{{%- elif message['role'] == 'assistant' -%}}{answer}"
        "{%- endif -%}{%- endfor -%}"
    )
