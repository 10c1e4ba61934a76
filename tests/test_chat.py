"""`qatune chat` driven through stdin with scripted turns; streaming, context trimming, EOS."""

from __future__ import annotations

import io
import json

import pytest
import torch

from qatune.cli import main
from qatune.data.encode import tokenize_with_eos
from qatune.data.records import Message
from qatune.data.templates import get_template
from qatune.generation.chat import ChatSession, StreamDecoder
from qatune.generation.sampling import SamplingConfig, generate_ids
from qatune.model.hf_io import export_hf, from_pretrained

SYSTEM = "You are terse."
GREEDY5 = SamplingConfig(max_new_tokens=5)


@pytest.fixture(scope="module")
def chat_run(hf_tiny_dir, gpt2_tokenizer, tmp_path_factory):
    run = tmp_path_factory.mktemp("chat_run")
    meta = {"template": get_template("chat", SYSTEM).to_dict(), "max_len": 128}
    export_hf(from_pretrained(hf_tiny_dir), run / "export", gpt2_tokenizer, {"qatune.json": json.dumps(meta)})
    return run


def greedy_reply(model, tokenizer, messages):
    [ids] = tokenize_with_eos([get_template("chat", SYSTEM).generation_prompt(messages)], tokenizer)
    [g] = generate_ids(model, [ids], tokenizer.eos_token_id, GREEDY5)
    return tokenizer.decode(g.ids), g.stopped_at_eos


def test_scripted_transcript(chat_run, gpt2_tokenizer, monkeypatch, capsys):
    script = "hello there\nhow are you?\n/reset\nhello there\n/what\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", str(chat_run), "--temperature", "0", "--max-new-tokens", "5"]) == 0
    transcript = capsys.readouterr().out

    model = from_pretrained(chat_run / "export")
    r1, eos1 = greedy_reply(model, gpt2_tokenizer, [Message("user", "hello there")])
    history = [Message("user", "hello there"), Message("assistant", r1), Message("user", "how are you?")]
    r2, eos2 = greedy_reply(model, gpt2_tokenizer, history)
    cut = "(reply cut at 5 tokens: the model emitted no EOS)\n"
    expected = (
        f"chat with {chat_run} (template 'chat', context 128 tokens, replies up to 5); "
        "/reset clears the conversation, /exit quits\n"
        f"you> hello there\nbot> {r1}\n{'' if eos1 else cut}"
        f"you> how are you?\nbot> {r2}\n{'' if eos2 else cut}"
        "you> /reset\n(conversation reset)\n"
        # after /reset the history is empty again: the same prompt, the same greedy reply
        f"you> hello there\nbot> {r1}\n{'' if eos1 else cut}"
        "you> /what\n(unknown command /what; /reset clears the conversation, /exit quits)\n"
        "you> /exit\n"
    )
    assert transcript == expected
    assert r1 != r2  # the second turn really saw the history


def test_reply_streams_during_generation(chat_run, gpt2_tokenizer):
    model = from_pretrained(chat_run / "export")
    steps = []
    model.register_forward_hook(lambda *_: steps.append(1))
    session = ChatSession(model, gpt2_tokenizer, get_template("chat", SYSTEM), SamplingConfig(max_new_tokens=8))
    seen_at = []  # forward passes done when each piece of text was written
    pieces = []
    gen = session.reply("tell me a story", lambda s: (seen_at.append(len(steps)), pieces.append(s)))
    assert "".join(pieces) == gpt2_tokenizer.decode(gen.ids) == session.history[-1].content
    assert len(pieces) > 1 and seen_at[0] < len(steps)  # text came out before generation ended


def test_stream_decoder_never_shows_half_a_character(gpt2_tokenizer):
    text = "Xin chào Việt Nam 🙂 ời"
    ids = gpt2_tokenizer(text).input_ids
    pieces = []
    stream = StreamDecoder(gpt2_tokenizer, pieces.append)
    for t in [*ids, gpt2_tokenizer.eos_token_id]:
        stream.push(t)
    stream.flush()
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) < len(ids)  # multi-token characters were held back until whole


def test_context_drops_oldest_exchanges_keeps_system(chat_run, gpt2_tokenizer):
    model = from_pretrained(chat_run / "export")
    session = ChatSession(model, gpt2_tokenizer, get_template("chat", SYSTEM), SamplingConfig(max_new_tokens=8), 64)
    for k in range(4):
        session.history += [Message("user", f"question number {k} " * 2), Message("assistant", f"answer {k} " * 3)]
    session.history.append(Message("user", "the newest question"))
    full = list(session.history)
    ids = session.prompt_ids()
    assert len(ids) <= 64 - 8 and session.dropped >= 1
    assert session.history == full[2 * session.dropped :]  # the newest exchanges, in order
    text = gpt2_tokenizer.decode(ids)
    assert text.startswith(f"### System:\n{SYSTEM}") and text.endswith("the newest question\n\n### Assistant:\n")
    assert "question number 0" not in text
    # maximal: keeping one more exchange would not fit
    assert len(session.encode(full[2 * (session.dropped - 1) :])) > 64 - 8


def test_too_long_message_is_refused_and_the_chat_goes_on(chat_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 200 + "\n/exit\n"))
    assert main(["chat", str(chat_run), "--temperature", "0", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "bot> (this message makes a prompt of" in out and "the context leaves 123" in out
    assert out.endswith("you> /exit\n")


def test_stops_cleanly_at_eos(tiny_model, gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    with torch.no_grad():  # make EOS the argmax everywhere
        tiny_model.ln_f.weight.zero_()
        tiny_model.ln_f.bias.fill_(1.0)
        tiny_model.wte.weight[eos] = 100.0
    session = ChatSession(tiny_model, gpt2_tokenizer, get_template("plain"), SamplingConfig(max_new_tokens=5))
    pieces = []
    gen = session.reply("hi", pieces.append)
    assert gen.stopped_at_eos and gen.ids == [] and pieces == []
    assert session.history == [Message("user", "hi"), Message("assistant", "")]


@pytest.mark.parametrize("template", ["raw", "plain", "chat"])
def test_history_is_tokenized_segment_by_segment_as_in_training(tiny_model, gpt2_tokenizer, template):
    """`raw` joins a prompt and its answer with no separator: "Count to 3" + "45" read as one text
    merges across the boundary (" 345" is one token); training tokenizes each segment apart."""
    from qatune.data.encode import encode_records
    from qatune.data.records import Record

    msgs = [Message("user", "Count to 3"), Message("assistant", "45")]
    msgs += [Message("user", "Again"), Message("assistant", "x")]
    tpl = get_template(template)
    trained = encode_records([Record("s", "s:1", messages=msgs)], tpl, gpt2_tokenizer)[0]
    session = ChatSession(tiny_model, gpt2_tokenizer, tpl, SamplingConfig(max_new_tokens=5))
    assert session.encode(msgs[:3]) == trained.input_ids[: trained.response_start]
    from types import SimpleNamespace

    from qatune.serve import protocol as api
    from qatune.serve.app import chat_prompt_ids

    served = SimpleNamespace(template=tpl, tokenizer=gpt2_tokenizer)
    chat = [api.ChatMessage(role=m.role, content=m.content) for m in msgs[:3]]
    assert chat_prompt_ids(chat, served) == trained.input_ids[: trained.response_start]  # qatune serve too
