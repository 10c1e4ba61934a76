"""Templates: exact renderings, the dict round trip used by qatune.json, and validation errors."""

from __future__ import annotations

import json

import pytest

from qatune.data.records import DataError, Message
from qatune.data.templates import TEMPLATES, Template, get_template


def test_named_templates_render_exactly():
    # The prompt ends in "Answer:" and the response carries GPT-2's natural leading space.
    assert get_template("plain").render_prompt("2+2?") == "Question: 2+2?\nAnswer:"
    assert get_template("plain").render_prompt("Translate", "Hola") == "Question: Translate\nHola\nAnswer:"
    assert get_template("plain").render_response("4") == " 4"
    assert get_template("plain").render_response("\n1. a\n2. b") == "\n1. a\n2. b"  # already spaced
    assert get_template("alpaca").render_response("4") == "4"
    assert get_template("raw").render_prompt("as is\n") == "as is\n"
    alpaca = get_template("alpaca")
    assert alpaca.render_prompt("Name a colour.").endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert "### Input:\nGood morning\n\n### Response:\n" in alpaca.render_prompt("Translate.", "Good morning")
    chat = get_template("chat", system_prompt="Be brief.")
    assert chat.render_prompt("Hi") == "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\n"


def test_round_trip_through_json_for_every_named_template():
    for name in TEMPLATES:
        tpl = get_template(name, system_prompt="S")
        again = Template.from_dict(json.loads(json.dumps(tpl.to_dict())))
        assert again == tpl and again.render_prompt("p", "c") == tpl.render_prompt("p", "c")


def test_custom_template_defaults_and_braces_in_data():
    tpl = get_template({"prompt": "Q: {prompt}\nA:"})
    assert tpl.name == "custom"
    assert tpl.render_prompt("{x} {}", "ctx") == "Q: {x} {}\n\nctx\nA:"  # data braces are not format fields


@pytest.mark.parametrize(
    ("d", "pattern"),
    [
        ({"prompt": "no placeholder"}, r"field 'prompt' must contain \{prompt\}"),
        ({"prompt": "{prompt} {answer}"}, r"field 'prompt' uses \{answer\}"),
        ({"prompt": "{prompt}", "promt": "x"}, r"unknown key 'promt'"),
        ({"name": "x"}, r"field 'prompt' \(a format string with \{prompt\}\) is missing"),
        ({"prompt": "{prompt", "name": "x"}, r"field 'prompt': .*literal brace"),
        ({"prompt": "{prompt}", "system": "no system"}, r"field 'system' must contain \{system\}"),
    ],
)
def test_template_errors_name_the_field(d, pattern):
    with pytest.raises(DataError, match=pattern):
        get_template(d)


def test_unknown_name_lists_the_named_templates():
    with pytest.raises(DataError, match="unknown template 'alpacca'; named templates: plain, raw, alpaca, chat"):
        get_template("alpacca")


def test_conversation_segments_and_generation_prompt():
    msgs = [Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Bye")]
    tpl = get_template("plain")
    assert tpl.render_conversation(msgs) == [
        ("Question: Hi\nAnswer:", False),
        (" Hello", True),
        ("Question: Bye\nAnswer:", False),
    ]
    assert tpl.generation_pieces(msgs) == ["Question: Hi\nAnswer:", " Hello<|endoftext|>", "Question: Bye\nAnswer:"]
    assert tpl.generation_prompt(msgs) == "Question: Hi\nAnswer: Hello<|endoftext|>Question: Bye\nAnswer:"
    with pytest.raises(ValueError, match="ends with a user turn"):
        tpl.generation_prompt(msgs[:2])
