"""qatune cuts sequences to the model's context itself (the data's truncation policy, prompt
budgets), so encoding a long text through qatune's tokenizer must not make transformers warn
"Token indices sequence length is longer than the specified maximum sequence length"; an export
still records the context as the tokenizer's `model_max_length`."""

from __future__ import annotations

import json
import logging

import pytest

from qatune.data.encode import encode_records
from qatune.data.records import Record
from qatune.data.templates import get_template
from qatune.model.hf_io import export_hf, from_pretrained
from qatune.model.reward import RewardModel, export_reward_hf
from qatune.model.tokenizer import load_tokenizer
from qatune.runs import load_tokenizer_for

WARNING = "Token indices sequence length is longer than the specified maximum"


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """What transformers logs (its library logger does not propagate to the root logger)."""
    handler = Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@pytest.fixture
def export_64(hf_tiny_dir, gpt2_tokenizer, tmp_path):
    """An export of a model trained for a 64-token context (as `qatune train` writes it)."""
    return export_hf(from_pretrained(hf_tiny_dir), tmp_path / "export", gpt2_tokenizer, max_len=64)


def test_exports_record_the_context(export_64, hf_tiny_dir, gpt2_tokenizer, tmp_path):
    config = json.loads((export_64 / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 64
    backbone = from_pretrained(hf_tiny_dir)
    reward = export_reward_hf(RewardModel(backbone), tmp_path / "reward", load_tokenizer_for(str(export_64), None))
    config = json.loads((reward / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == backbone.config.n_positions


def test_encoding_past_the_context_gives_no_length_warning(export_64, transformers_warnings):
    tokenizer = load_tokenizer_for(str(export_64), None)
    long_text = "The quick brown fox jumps over the lazy dog. " * 40  # ~400 tokens > 64
    record = Record(source="x.jsonl", where="x.jsonl:1", prompt="Summarize: " + long_text, response=long_text)
    [encoded] = encode_records([record], get_template("alpaca"), tokenizer)
    assert len(encoded.input_ids) > 64  # the whole record was encoded: cutting is the data policy's job
    assert len(tokenizer(long_text).input_ids) > 64
    assert not [m for m in transformers_warnings if WARNING in m]


def test_the_hub_gpt2_folder_gives_no_warning_past_1024_tokens(gpt2_tokenizer, tmp_path, transformers_warnings):
    gpt2_tokenizer.save_pretrained(tmp_path / "gpt2")
    config_file = tmp_path / "gpt2" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "model_max_length": 1024}))  # as the hub's gpt2 folder says
    tokenizer = load_tokenizer(tmp_path / "gpt2")
    assert len(tokenizer(" word" * 1500).input_ids) == 1500
    assert not [m for m in transformers_warnings if WARNING in m]
