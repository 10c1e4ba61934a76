"""`template: model`: a tokenizer folder's own chat template, as it is. The ids are
`apply_chat_template`'s token for token, the loss is exactly the assistant turns (answer +
end-of-turn token), and the generation prompt is apply_chat_template's with
add_generation_prompt, for ChatML (Qwen2.5's template and tokenizer) and Llama 3's template:
single turn, with a system prompt, multi-turn, with a passage."""

from __future__ import annotations

import pytest
from tests.chat_templates import (  # noqa: F401  (fixtures)
    CHATML_MARKED,
    hf_ids,
    llama3_folder,
    qwen_cache,
    qwen_folder,
    with_template,
)

from qatune.check import loss_runs
from qatune.data.encode import encode_records, generation_ids, stop_ids
from qatune.data.example import IGNORE
from qatune.data.model_template import ChatTemplateError, ModelTemplate
from qatune.data.pipeline import DataConfig, load_examples
from qatune.data.records import Message, Record
from qatune.data.templates import Template, bind_template, get_template
from qatune.model.tokenizer import load_tokenizer

CONVERSATIONS = {
    "single": [Message("user", "What is 12345 + 1?"), Message("assistant", "12346.")],
    "system": [
        Message("system", "Answer in one word."),
        Message("user", "Thủ đô của Việt Nam là gì?"),
        Message("assistant", "Hà Nội"),
    ],
    "multi": [
        Message("user", "Hi!"),
        Message("assistant", "Hello. How can I help?"),
        Message("user", "Name a colour.\n"),
        Message("assistant", "  Blue, like the sky.\n"),  # Llama 3's template trims it
        Message("user", "Another?"),
        Message("assistant", "Green"),
    ],
}
END = {"qwen": "<|im_end|>", "llama3": "<|eot_id|>"}


@pytest.fixture(scope="module", params=["qwen", "llama3"])
def case(request, qwen_folder, llama3_folder):  # noqa: F811
    from transformers import AutoTokenizer

    folder = {"qwen": qwen_folder, "llama3": llama3_folder}[request.param]
    return request.param, load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def as_dicts(messages: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def encode(tok, messages, template="model", **kw):
    record = Record("s", "s:1", messages=messages)
    return encode_records([record], get_template(template, **kw), tok)[0]


def trained_runs(enc) -> list[list[int]]:
    return loss_runs(enc.labels)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_ids_are_apply_chat_templates_and_the_loss_is_each_answer_and_its_end_token(case, name):
    family, tok, hf = case
    messages = CONVERSATIONS[name]
    enc = encode(tok, messages)
    assert enc.input_ids == hf_ids(hf.apply_chat_template(as_dicts(messages), tokenize=True))
    # ChatML writes an answer as it is; Llama 3's template trims it.
    answers = [m.content.strip() if family == "llama3" else m.content for m in messages if m.role == "assistant"]
    assert [tok.decode(run) for run in trained_runs(enc)] == [a + END[family] for a in answers]
    # The generation prompt is apply_chat_template's, and exactly what precedes the last answer.
    history = messages[:-1]
    want = hf_ids(hf.apply_chat_template(as_dicts(history), tokenize=True, add_generation_prompt=True))
    assert generation_ids(get_template("model"), history, tok) == want == enc.input_ids[: enc.response_start]
    # An answer ends at EOS or the end-of-turn token (Llama 3's folder has <|eot_id|> as its EOS).
    end = [] if tok.eos_token == END[family] else [tok.convert_tokens_to_ids(END[family])]
    assert stop_ids(get_template("model"), tok) == [tok.eos_token_id, *end]


def test_the_mask_is_transformers_assistant_mask_of_the_marked_template(qwen_folder, tmp_path):  # noqa: F811
    """Qwen2.5's template (no generation markers) and the same ChatML with TRL-style markers render
    a conversation with a system message alike; qatune's mask from Qwen2.5's template equals
    transformers' `return_assistant_tokens_mask` on the marked one, and qatune reads the markers too."""
    from transformers import AutoTokenizer

    marked = with_template(qwen_folder, tmp_path / "marked", CHATML_MARKED)
    hf = AutoTokenizer.from_pretrained(marked)
    for messages in (CONVERSATIONS["system"], [Message("system", "Be kind."), *CONVERSATIONS["multi"]]):
        out = hf.apply_chat_template(
            as_dicts(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        want = [t if m else IGNORE for t, m in zip(out["input_ids"], out["assistant_masks"])]
        for folder in (qwen_folder, marked):
            enc = encode(load_tokenizer(folder), messages)
            assert enc.input_ids == list(out["input_ids"]) and enc.labels == want


def test_last_turn_only(case):
    family, tok, _ = case
    enc = encode_records([Record("s", "s:1", messages=CONVERSATIONS["multi"])], get_template("model"), tok, "last")[0]
    assert [tok.decode(run) for run in trained_runs(enc)] == ["Green" + END[family]]


def test_a_records_passage_and_the_configured_system_prompt_enter_the_messages(case):
    _, tok, hf = case
    record = Record("s", "s:1", prompt="Who wrote it?", response="Tô Hoài", context="Dế Mèn phiêu lưu ký của Tô Hoài.")
    template = get_template("model", system_prompt="Trả lời ngắn gọn.")
    enc = encode_records([record], template, tok)[0]
    messages = [
        {"role": "system", "content": "Trả lời ngắn gọn."},
        {"role": "user", "content": "Who wrote it?\n\nDế Mèn phiêu lưu ký của Tô Hoài."},
        {"role": "assistant", "content": "Tô Hoài"},
    ]
    assert enc.input_ids == hf_ids(hf.apply_chat_template(messages, tokenize=True))
    prompt = bind_template(template, tok).render_prompt(record.prompt, record.context)
    assert prompt == hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    # A record's own system message wins over the configured one.
    own = encode(tok, CONVERSATIONS["system"], system_prompt="ignored")
    assert "ignored" not in tok.decode(own.input_ids)


def test_qwen_writes_its_default_system_message_when_there_is_none(qwen_folder):  # noqa: F811
    tok = load_tokenizer(qwen_folder)
    assert tok.decode(encode(tok, CONVERSATIONS["single"]).input_ids).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    )


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_record_turn_and_template(qwen_folder, tmp_path):  # noqa: F811
    # Like Qwen3's: earlier answers are rendered without what the last one shows.
    rewrites = (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
        "{%- if m.role == 'assistant' and not loop.last %}{{- '(earlier)' }}{%- else %}{{- m.content }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    folder = with_template(qwen_folder, tmp_path / "rewrites", rewrites)
    refused = r"s:1: the chat template of .*rewrites.* assistant turn 1 .*generation"
    with pytest.raises(ChatTemplateError, match=refused):
        encode(load_tokenizer(folder), CONVERSATIONS["multi"])


def test_a_tokenizer_without_a_chat_template_is_one_line(tokenizer_dir):
    with pytest.raises(ChatTemplateError, match="has no chat template .* use one of qatune's templates"):
        encode(load_tokenizer(tokenizer_dir), CONVERSATIONS["single"])


def test_the_bound_template_is_saved_and_read_back_whole(qwen_folder):  # noqa: F811
    tok = load_tokenizer(qwen_folder)
    bound = bind_template(get_template("model", system_prompt="S"), tok)
    assert bound.chat_template == tok.chat_template and bound.special_tokens["eos_token"] == "<|endoftext|>"
    again = Template.from_dict(bound.to_dict())
    assert isinstance(again, ModelTemplate) and again == bound
    reordered = get_template({"name": "model", "prompt_with_context": "{context}\n{prompt}"})
    assert reordered.user_content("q", "c") == "c\nq"
    # The run's data pipeline records the bound template (the run's qatune.json has the Jinja text).
    cfg = DataConfig(sources=[], template="model")
    assert cfg.get_template() == ModelTemplate()


def test_the_pipeline_trains_on_the_model_template(qwen_folder, tmp_path):  # noqa: F811
    import json

    data = tmp_path / "d.jsonl"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    data.write_text(json.dumps({"messages": messages}) + "\n")
    tok = load_tokenizer(qwen_folder)
    loaded = load_examples(DataConfig(sources=[str(data)], template="model"), tok)
    assert loaded.template.chat_template == tok.chat_template
    assert tok.decode([t for t in loaded.examples[0].labels if t != IGNORE]) == "Yo<|im_end|>"


@pytest.mark.parametrize("bound", [True, False])
def test_a_gpt2_export_keeps_the_models_template_as_it_is(bound, qwen_folder, tiny_model, tmp_path):  # noqa: F811
    """Bound (a run's saved template, with its Jinja text) or not (`template: model` from a config
    alone): the exported tokenizer's chat template is the tokenizer's own, unchanged."""
    from transformers import AutoTokenizer

    from qatune.model.hf_io import export_hf

    tok = load_tokenizer(qwen_folder)
    template = bind_template(get_template("model"), tok) if bound else get_template("model")
    export_hf(tiny_model, tmp_path / "out", tok, template=template.to_dict(), max_len=64)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == tok.chat_template
