"""Tokenization with masking, EOS handling and truncation policies, on the real GPT-2 tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qatune.data.encode import encode_records
from qatune.data.example import IGNORE
from qatune.data.records import DataError, Message, Record
from qatune.data.templates import get_template
from qatune.data.truncation import POLICIES, truncate

EOS = 50256


def encode_one(tok, prompt, response, template="plain", **kw):
    return encode_records([Record("s", "s:1", prompt=prompt, response=response, **kw)], get_template(template), tok)[0]


def label_ids(example):
    return [t for t in example.labels if t != IGNORE]


def test_plain_answer_is_the_token_sequence_pretrained_gpt2_produces(gpt2_tokenizer):
    tok = gpt2_tokenizer
    enc = encode_one(tok, "What is the capital of France?", "Paris")
    prompt_ids = tok("Question: What is the capital of France?\nAnswer:")["input_ids"]
    assert enc.input_ids == prompt_ids + tok(" Paris")["input_ids"] + [EOS]
    assert enc.labels == [IGNORE] * len(prompt_ids) + tok(" Paris")["input_ids"] + [EOS]
    # Prompt and answer tokenized apart give exactly what the joined text gives: no lone " " token
    # that GPT-2 never produces before a word.
    assert enc.input_ids[:-1] == tok("Question: What is the capital of France?\nAnswer: Paris")["input_ids"]


def test_a_prompt_ending_in_a_space_is_why_pieces_are_tokenized_apart(gpt2_tokenizer):
    tok = gpt2_tokenizer
    enc = encode_one(tok, "What is the capital of France?", "Paris", template={"prompt": "Q: {prompt}\nA: "})
    prompt_ids = tok("Q: What is the capital of France?\nA: ")["input_ids"]
    assert prompt_ids[-1] == tok(" ")["input_ids"][0]  # GPT-2's lone space token ends the prompt
    assert enc.labels == [IGNORE] * len(prompt_ids) + tok("Paris")["input_ids"] + [EOS]
    # The joined text tokenizes differently (" Paris" is one token): searching for the prompt's
    # tokens in it would misplace the boundary.
    joined = tok("Q: What is the capital of France?\nA: Paris")["input_ids"]
    assert joined[: len(prompt_ids)] != prompt_ids


def test_literal_eos_in_data_becomes_one_eos_id(gpt2_tokenizer):
    enc = encode_one(gpt2_tokenizer, "Is it?", "No<|endoftext|>", template="raw")
    assert label_ids(enc) == gpt2_tokenizer("No")["input_ids"] + [EOS]  # not a second EOS, not 7 char tokens
    enc = encode_one(gpt2_tokenizer, "a<|endoftext|>b", "c", template="raw")
    assert enc.input_ids[:3] == [64, EOS, 65] and enc.labels[:3] == [IGNORE] * 3


def test_conversation_trains_every_or_last_assistant_turn(gpt2_tokenizer):
    tok = gpt2_tokenizer
    msgs = [
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello"),
        Message("user", "Bye"),
        Message("assistant", "Goodbye"),
    ]
    rec = Record("s", "s:1", messages=msgs)
    tpl = get_template("chat")
    all_turns = encode_records([rec], tpl, tok, "all")[0]
    last_turn = encode_records([rec], tpl, tok, "last")[0]
    assert all_turns.input_ids == last_turn.input_ids
    assert label_ids(all_turns) == tok("Hello")["input_ids"] + [EOS] + tok("Goodbye")["input_ids"] + [EOS]
    assert label_ids(last_turn) == tok("Goodbye")["input_ids"] + [EOS]
    text = tok.decode(all_turns.input_ids)
    assert text.startswith(
        "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello<|endoftext|>### User:\nBye"
    )
    history = tpl.generation_prompt(msgs[:4])
    assert tok(history)["input_ids"] == all_turns.input_ids[: all_turns.response_start]


def make(tok, p_len, r_len):
    """An encoding with a prompt of p_len tokens and a response of r_len tokens (EOS included)."""
    return encode_one(tok, " a" * (p_len - 6), " b" * (r_len - 1), template="plain")


@pytest.mark.parametrize("policy", POLICIES)
def test_fitting_examples_are_untouched_by_every_policy(gpt2_tokenizer, policy):
    enc = make(gpt2_tokenizer, 20, 10)
    ex, outcome = truncate(enc, policy, 30)
    assert ex.input_ids == enc.input_ids and ex.labels == enc.labels and not outcome.truncated


def test_truncation_policies(gpt2_tokenizer):
    enc = make(gpt2_tokenizer, 20, 10)
    assert len(enc) == 30 and enc.response_start == 20
    prompt, response = enc.input_ids[:20], enc.input_ids[20:]

    ex, o = truncate(enc, "cut_response", 25)
    assert ex.input_ids == prompt + response[:5] and o.truncated and o.eos_lost
    assert ex.labels == [IGNORE] * 20 + response[:5]

    ex, o = truncate(enc, "drop", 25)
    assert ex is None and o.dropped and not o.no_loss

    ex, o = truncate(enc, "cut_prompt_left", 25)
    assert ex.input_ids == prompt[5:] + response and not o.eos_lost
    assert label_ids(ex) == response

    ex, o = truncate(enc, "cut_prompt_middle", 25)
    assert ex.input_ids == prompt[:8] + prompt[-7:] + response and not o.eos_lost

    with pytest.raises(DataError, match=r"s:1: 30 tokens \(prompt 20 \+ response 10\) exceed max_len 25"):
        truncate(enc, "error", 25)


def test_cut_response_drops_a_prompt_that_fills_max_len(gpt2_tokenizer):
    enc = make(gpt2_tokenizer, 20, 10)
    ex, o = truncate(enc, "cut_response", 20)
    assert ex is None and o.no_loss
    ex, o = truncate(enc, "cut_prompt_left", 8)  # response alone too long: one prompt token kept
    assert ex.input_ids == enc.input_ids[19:27] and ex.labels[0] == IGNORE and o.eos_lost and len(ex) == 8


PIECES = list("abc xyz,.?!\n\t ") + ["Tiếng", " Việt", " có dấu", "ơư", "đ", "😀", "👍🏽", "日本", "  ", "{x}"]
TEXT = st.lists(st.sampled_from(PIECES) | st.text(max_size=3), min_size=1, max_size=25).map("".join).filter(str.strip)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=TEXT, response=TEXT, template=st.sampled_from(["plain", "raw", "alpaca", "chat"]))
def test_labels_decode_to_response_plus_eos(gpt2_tokenizer, prompt, response, template):
    tok = gpt2_tokenizer
    enc = encode_one(tok, prompt, response, template=template)
    assert tok.decode(label_ids(enc)) == get_template(template).render_response(response) + "<|endoftext|>"
    rendered = get_template(template).render_prompt(prompt)
    assert enc.labels[: enc.response_start] == [IGNORE] * enc.response_start  # no prompt token in the loss
    assert tok.decode(enc.input_ids[: enc.response_start]) == rendered
    # Default policy, any max_len with room for a loss token: the instruction is never cut.
    max_len = enc.response_start + 1
    ex, o = truncate(enc, "cut_response", max_len)
    assert ex.input_ids[: enc.response_start] == enc.input_ids[: enc.response_start]
    assert ex.n_label_tokens == min(len(enc) - enc.response_start, max_len - enc.response_start) >= 1


def test_cut_response_on_a_conversation_keeps_earlier_answers(gpt2_tokenizer):
    tok = gpt2_tokenizer
    msgs = [Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "word " * 40)]
    msgs.append(Message("assistant", "ok"))
    enc = encode_records([Record("s", "s:1", messages=msgs)], get_template("plain"), tok)[0]
    first_answer = tok(" Hello")["input_ids"] + [EOS]  # plain: the answer's own leading space
    ex, o = truncate(enc, "cut_response", enc.response_start - 5)  # the last prompt alone overflows
    assert ex is not None and o.truncated and o.eos_lost and not o.no_loss
    assert label_ids(ex) == first_answer  # the first answer is still trained on
    ex, o = truncate(enc, "cut_response", 6)  # only part of the first question fits: nothing to learn
    assert ex is None and o.no_loss
