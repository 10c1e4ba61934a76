"""The chat layouts users bring: ShareGPT (`conversations` of `from`/`value`, roles human/gpt/system),
OpenAI messages, Alpaca with `history` and `system`, field mappings for other key names, and fields
that hold data the layout does not read (an error when it changes what is trained, else a warning).

Each test writes a real file and reads it through `load_examples` (what `qatune train` calls) or the
`qatune stats` command, and checks the text the model sees and exactly which tokens carry loss."""

from __future__ import annotations

import json

import pytest

from qatune.cli import main
from qatune.data.example import IGNORE
from qatune.data.pipeline import DataConfig, load_examples
from qatune.data.records import DataError

SYSTEM = "Trả lời ngắn gọn."  # a system prompt, in Vietnamese: multi-byte text survives the round trip
CHAT_TEXT = (
    f"### System:\n{SYSTEM}\n\n"
    "### User:\nName a colour.\n\n### Assistant:\nBlue<|endoftext|>"
    "### User:\nAnd another?\n\n### Assistant:\nRed<|endoftext|>"
)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def load(path, tokenizer, **data):
    result = load_examples(DataConfig(sources=[str(path)], template=data.pop("template", "chat"), **data), tokenizer)
    return result


def seen(example, tokenizer) -> tuple[str, str]:
    """(the whole text the model sees, the text of the tokens in the loss)."""
    loss = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    return tokenizer.decode(example.input_ids), tokenizer.decode(loss)


def test_sharegpt_conversations_train_on_gpt_turns_with_the_system_prompt(tmp_path, gpt2_tokenizer):
    turns = [
        {"from": "system", "value": SYSTEM},
        {"from": "human", "value": "Name a colour."},
        {"from": "gpt", "value": "Blue"},
        {"from": "human", "value": "And another?"},
        {"from": "gpt", "value": "Red"},
    ]
    path = write_jsonl(tmp_path / "share.jsonl", [{"id": "a1", "conversations": turns}])
    result = load(path, gpt2_tokenizer)
    assert result.layouts == {path: "sharegpt"} and result.report.warnings == []
    text, loss = seen(result.examples[0], gpt2_tokenizer)
    assert text == CHAT_TEXT
    assert loss == "Blue<|endoftext|>Red<|endoftext|>"
    last = load(path, gpt2_tokenizer, train_on_turns="last")
    assert seen(last.examples[0], gpt2_tokenizer)[1] == "Red<|endoftext|>"


def test_sharegpt_with_user_assistant_roles_and_a_system_field(tmp_path, gpt2_tokenizer):
    """LLaMA-Factory's ShareGPT: roles user/assistant in `from`, the system prompt as a field; a JSON array."""
    row = {
        "conversations": [
            {"from": "user", "value": "Name a colour."},
            {"from": "assistant", "value": "Blue"},
            {"from": "user", "value": "And another?"},
            {"from": "assistant", "value": "Red"},
        ],
        "system": SYSTEM,
    }
    path = tmp_path / "share.json"
    path.write_text(json.dumps([row], ensure_ascii=False), encoding="utf-8")
    text, loss = seen(load(path, gpt2_tokenizer).examples[0], gpt2_tokenizer)
    assert text == CHAT_TEXT and loss == "Blue<|endoftext|>Red<|endoftext|>"


def test_messages_take_a_system_field_too(tmp_path, gpt2_tokenizer):
    row = {
        "system": SYSTEM,
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue"},
            {"role": "user", "content": "And another?"},
            {"role": "assistant", "content": "Red"},
        ],
    }
    text, loss = seen(load(write_jsonl(tmp_path / "m.jsonl", [row]), gpt2_tokenizer).examples[0], gpt2_tokenizer)
    assert text == CHAT_TEXT and loss == "Blue<|endoftext|>Red<|endoftext|>"


def test_alpaca_history_becomes_earlier_turns_and_system_is_the_system_prompt(tmp_path, gpt2_tokenizer):
    """Old code: exit 0 and the history (and system) silently gone from the text the model sees."""
    row = {
        "instruction": "Translate to French.",
        "input": "Good night",
        "output": "Bonne nuit",
        "system": SYSTEM,
        "history": [["Name a colour.", "Blue"], ["And another?", "Red"]],
    }
    path = write_jsonl(tmp_path / "alpaca.jsonl", [row, {"instruction": "Say hi.", "output": "Hi"}])
    result = load(path, gpt2_tokenizer)
    assert result.layouts == {path: "alpaca"} and result.report.warnings == []
    text, loss = seen(result.examples[0], gpt2_tokenizer)
    assert (
        text == CHAT_TEXT + "### User:\nTranslate to French.\n\nGood night\n\n### Assistant:\nBonne nuit<|endoftext|>"
    )
    assert loss == "Blue<|endoftext|>Red<|endoftext|>Bonne nuit<|endoftext|>"
    text, loss = seen(load(path, gpt2_tokenizer, train_on_turns="last").examples[0], gpt2_tokenizer)
    assert loss == "Bonne nuit<|endoftext|>"
    # A record without history or system stays a plain prompt/response pair, rendered as before.
    text, loss = seen(result.examples[1], gpt2_tokenizer)
    assert text == "### User:\nSay hi.\n\n### Assistant:\nHi<|endoftext|>" and loss == "Hi<|endoftext|>"


def test_a_mapping_names_the_turn_list_and_its_role_and_content_keys(tmp_path, gpt2_tokenizer, tokenizer_dir, capsys):
    """Through `qatune stats --mapping`, as a user types it."""
    row = {
        "dialog": [
            {"speaker": "human", "text": "Name a colour."},
            {"speaker": "gpt", "text": "Blue"},
            {"speaker": "human", "text": "And another?"},
            {"speaker": "gpt", "text": "Red"},
        ],
        "sys": SYSTEM,
    }
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    mapping = ["messages=dialog", "role=speaker", "content=text", "system=sys"]
    args = ["stats", path, "--tokenizer", str(tokenizer_dir), "--template", "chat", "--json", "-"]
    assert main([*args, *(a for m in mapping for a in ("--mapping", m))]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("\n{") + 1 :])
    assert report["layouts"] == {path: "mapping"} and not any("does not use" in w for w in report["warnings"])
    assert report["chars_per_token"]["system"]["texts"] == 1  # the mapped system field is read
    assert (
        report["response_tokens"]["sum"]
        == len(gpt2_tokenizer("Blue")["input_ids"] + gpt2_tokenizer("Red")["input_ids"]) + 2
    )
    cfg = dict(mapping=dict(m.split("=") for m in mapping))
    text, loss = seen(load(path, gpt2_tokenizer, **cfg).examples[0], gpt2_tokenizer)
    assert text == CHAT_TEXT and loss == "Blue<|endoftext|>Red<|endoftext|>"


def test_a_pair_mapping_reads_history_and_system_when_named(tmp_path, gpt2_tokenizer):
    row = {
        "q": "Translate to French.",
        "a": "Bonne nuit",
        "ctx": "Good night",
        "sys": SYSTEM,
        "past": [["Name a colour.", "Blue"]],
    }
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    mapping = {"prompt": "q", "response": "a", "context": "ctx", "system": "sys", "history": "past"}
    text, loss = seen(load(path, gpt2_tokenizer, mapping=mapping).examples[0], gpt2_tokenizer)
    assert text.startswith(f"### System:\n{SYSTEM}\n\n### User:\nName a colour.\n\n### Assistant:\nBlue<|endoftext|>")
    assert loss == "Blue<|endoftext|>Bonne nuit<|endoftext|>"


@pytest.mark.parametrize(
    ("rows", "mapping", "message"),
    [
        (  # a mapping that leaves out a history the rows carry
            [{"q": "Hi", "a": "Hello"}, {"q": "Hi", "a": "Hello", "history": [["x", "y"]]}],
            {"prompt": "q", "response": "a"},
            r"data\.jsonl:2: field 'history' holds earlier turns, but the mapping \(prompt=q response=a\) does not use "
            r"it; add history=history to the mapping",
        ),
        (
            [{"q": "Hi", "a": "Hello", "system": "Be brief."}],
            {"prompt": "q", "response": "a"},
            r"data\.jsonl:1: field 'system' holds a system prompt, but the mapping .* add system=system to the mapping",
        ),
        (
            [{"sys": "Be brief.", "system": "Be kind.", "dialog": [{"role": "user", "content": "x"}]}],
            {"messages": "dialog", "system": "sys"},
            r"data\.jsonl:1: field 'system' holds a system prompt, but the mapping \(messages=dialog system=sys\) does "
            r"not use it; remove the field, or give a mapping that reads it",
        ),
        (
            [{"system": "Be kind.", "dialog": [{"role": "user", "content": "x"}]}],
            {"messages": "dialog"},
            r"data\.jsonl:1: field 'system' holds a system prompt, .* add system=system to the mapping",
        ),
        (
            [{"instruction": "Hi", "output": "Hello", "tools": [{"name": "search"}]}],
            None,
            r"data\.jsonl:1: field 'tools' holds tool definitions, which no template renders, but layout alpaca",
        ),
        (
            [{"instruction": "Hi", "output": "Hello", "history": [["only one"]]}],
            None,
            r"data\.jsonl:1: field 'history\[0\]' must be an \[instruction, response\] pair",
        ),
        (
            [{"instruction": "Hi", "output": "Hello", "history": [["Name a colour.", 7]]}],
            None,
            r"data\.jsonl:1: field 'history\[0\]\[1\]' is a int, not a string",
        ),
        (
            [{"system": "A", "conversations": [{"from": "system", "value": "B"}, {"from": "human", "value": "x"}]}],
            None,
            r"data\.jsonl:1: field 'conversations': field 'system' and a system turn; a conversation has one system",
        ),
        (
            [{"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{}"}]}],
            None,
            r"data\.jsonl:1: field 'conversations\[1\]\.from' is 'function_call', not one of system, user, assistant",
        ),
        (
            [{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "messages": []}],
            {"messages": "conversations"},
            None,  # an empty `messages` list holds nothing: no error
        ),
    ],
    ids=[
        "mapping-history",
        "mapping-system",
        "messages-two-systems",
        "messages-system",
        "tools",
        "history-shape",
        "history-type",
        "two-systems",
        "role",
        "empty",
    ],
)
def test_a_field_that_would_change_training_is_an_error_naming_file_record_and_field(
    tmp_path, gpt2_tokenizer, rows, mapping, message
):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    if message is None:
        load(path, gpt2_tokenizer, mapping=mapping)
        return
    with pytest.raises(DataError, match=message):
        load(path, gpt2_tokenizer, mapping=mapping)


def test_an_unknown_extra_field_is_a_counted_warning_and_identifiers_are_fine(tmp_path, gpt2_tokenizer):
    """Old code warned only about string fields: a list such as `tags` was dropped without a word."""
    rows = [
        {"id": 1, "source": "web", "instruction": "Hi", "output": "Hello", "tags": ["greeting"], "score": 0.9},
        {"id": 2, "source": "web", "instruction": "Bye", "output": "Goodbye", "tags": []},
    ]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    result = load(path, gpt2_tokenizer)
    assert len(result.examples) == 2
    assert result.report.warnings == [
        f"{path}: field 'tags' holds text in 1 of 2 records, but layout alpaca (instruction, output) does not use it; "
        "give a field mapping to use it"
    ]
