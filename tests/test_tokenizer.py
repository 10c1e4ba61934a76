"""The GPT-2 tokenizer from each source gives GPT-2's ids, with EOS set."""

from __future__ import annotations

import shutil

import pytest
from tests.chat_templates import qwen_cache, qwen_folder  # noqa: F401  (fixtures)

from qatune.model.tokenizer import ENV_VAR, TokenizerError, load_tokenizer


def check(tok):
    assert tok("Hello world").input_ids == [15496, 995]
    assert tok.eos_token_id == 50256 and tok.pad_token_id == 50256
    # literal <|endoftext|> in text is the EOS id, not 7 character tokens
    assert tok("a<|endoftext|>b").input_ids == [64, 50256, 65]
    assert tok.decode([15496, 995]) == "Hello world"


def test_folder_with_tokenizer_json(tokenizer_dir):
    check(load_tokenizer(tokenizer_dir))


def test_vocab_and_merges_only(tokenizer_dir, tmp_path):
    # GPT2TokenizerFast(vocab_file=, merges_file=) builds an EMPTY tokenizer in transformers 5.x;
    # qatune builds the BPE itself from the two files.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    check(load_tokenizer(tmp_path))
    check(load_tokenizer(tmp_path / "vocab.json"))


def test_environment_variable_is_the_default(tokenizer_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tokenizer_dir))
    check(load_tokenizer())


def test_a_folder_without_tokenizer_files_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json, nor vocab.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="is not a folder with tokenizer files"):
        load_tokenizer(tmp_path / "missing" / "tok")


@pytest.mark.parametrize("tokenizer_class", ["Qwen2Tokenizer", "PreTrainedTokenizerFast", None])
def test_a_model_folders_tokenizer_loads_as_autotokenizer_loads_it(tokenizer_class, qwen_folder, tmp_path):  # noqa: F811
    """A Qwen2.5 folder (Qwen2Tokenizer), a Llama 3 folder (PreTrainedTokenizerFast) and a bare
    tokenizer.json keep their own pre-tokenizer and normalizer: GPT2TokenizerFast, which loaded them
    before, puts GPT-2's byte-level regex in place of Qwen's and splits "hậu-hậu" as `-`, `h`."""
    import json

    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(qwen_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if tokenizer_class is None:
        (folder / "tokenizer_config.json").unlink()
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}))
    text = "hậu-hậu 12345 Xin chào<|im_start|>user\n"
    ours, auto = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert ours("-hậu")["input_ids"] == [2832, 125285]  # Qwen's "-h" token, as Qwen's own encoder has it
    assert ours.chat_template == auto.chat_template
    assert ours.eos_token == "<|endoftext|>"
