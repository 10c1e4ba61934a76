"""`qatune check` on reading-comprehension data (context, question, answer): the exported chat
template carries the passage, so every record's prompt is compared; text is decoded in whole spans,
so Vietnamese shows intact; truncation that drops examples is a warning naming the policy that keeps
them."""

from __future__ import annotations

from pathlib import Path

import pytest

from qatune.check import chat_messages, loss_spans
from qatune.cli import main
from qatune.data.encode import encode_records
from qatune.data.example import EncodedExample
from qatune.data.records import Message, Record
from qatune.data.templates import TEMPLATES, get_template
from qatune.model.hf_io import export_hf, from_pretrained

TINY_CPU = Path(__file__).parents[1] / "configs" / "tiny-cpu.yaml"
QUESTION = "Ai thua đội Broncos ở vòng bảng?"
PASSAGE = "Broncos đã đánh bại Pittsburgh Steelers ở vòng bảng với điểm số 23-16."


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_the_exported_chat_template_renders_a_records_passage(name, hf_tiny_dir, gpt2_tokenizer, tmp_path):
    """A user message with a `context` key renders through the template's prompt_with_context: the
    ids are the prompt ids training feeds for the same record (the old template dropped the passage)."""
    from transformers import AutoTokenizer

    template = get_template(name)
    export_hf(from_pretrained(hf_tiny_dir), tmp_path / "out", gpt2_tokenizer, template=template.to_dict(), max_len=96)
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    pair = Record("q.jsonl", "q.jsonl:1", prompt=QUESTION, response="Pittsburgh Steelers", context=PASSAGE)
    turns = [
        Message("system", "Trả lời ngắn gọn."),
        Message("user", "Xin chào\n"),
        Message("assistant", "Chào bạn"),
        Message("user", QUESTION, context=PASSAGE),
        Message("assistant", "Pittsburgh Steelers"),
    ]
    chat = Record("c.jsonl", "c.jsonl:1", messages=turns)
    assert chat_messages(pair) == [{"role": "user", "content": QUESTION, "context": PASSAGE}]
    for record in (pair, chat):
        messages = chat_messages(record)
        [enc] = encode_records([record], template, gpt2_tokenizer, "last")
        got = hf.apply_chat_template(messages, add_generation_prompt=True)
        got = list(got["input_ids"] if hasattr(got, "keys") else got)
        assert got == enc.input_ids[: enc.response_start], record.where
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert PASSAGE in text and QUESTION in text


def test_loss_spans_decode_whole_runs_so_vietnamese_stays_intact(gpt2_tokenizer):
    prompt = gpt2_tokenizer(QUESTION + "\n", add_special_tokens=False)["input_ids"]
    answer = gpt2_tokenizer("Đội Steelers", add_special_tokens=False)["input_ids"] + [gpt2_tokenizer.eos_token_id]
    example = EncodedExample(prompt + answer, [-100] * len(prompt) + answer)
    token_by_token = "".join(gpt2_tokenizer.decode([t]) for t in example.input_ids)
    assert "\ufffd" in token_by_token  # why the old per-token rendering showed `�`
    spans = loss_spans(example, gpt2_tokenizer)
    assert spans == [(QUESTION + "\n", False, len(prompt)), ("Đội Steelers<|endoftext|>", True, len(answer))]


@pytest.mark.slow
def test_check_on_vietnamese_xquad_compares_every_record_and_prints_it_intact(
    data_dir, tokenizer_dir, tmp_path, capsys
):
    """As a user types it: the shipped tiny config pointed at XQuAD-vi (64 records, 14 of whose prompts
    alone pass 1,024 tokens). Old code: the chat template check compared 0 records and failed (exit
    1), the example printed `�` for every multi-byte character, and truncation said PASS."""
    data = data_dir / "xquad_vi" / "train.jsonl"
    overrides = [
        f"data.sources=[{data}]",
        "data.max_len=1024",
        "model.n_positions=1024",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        f"tokenizer={tokenizer_dir}",
        f"out_dir={tmp_path / 'runs'}",
        "threads=1",
        "device=cpu",
        "compile=false",
    ]
    rc = main(["check", str(TINY_CPU), *overrides, "--sample", "64"])
    out = capsys.readouterr().out
    assert rc == 0, out  # a warning does not fail the check
    assert "64 of 64 records: apply_chat_template == the prompt ids training uses" in out
    assert "\ufffd" not in out and QUESTION in out
    assert "WARN truncation: 21.9% of the examples dropped" in out
    assert "14 dropped (14 with no loss token left); data.truncation=cut_prompt_middle keeps 64 of 64" in out
    assert "all 8 checks passed (1 with a warning: truncation)" in out
