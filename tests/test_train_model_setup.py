"""What a run starts from: dropout on pretrained weights too, the tokenizer the config reference
promises, and a dropout stream of its own on every rank."""

from __future__ import annotations

import json

import pytest
import torch

from qatune.methods.config import TrainConfig
from qatune.model.hf_io import export_hf, from_pretrained
from qatune.train.config import ModelConfig
from qatune.train.runtime import make_model


def test_dropout_applies_to_pretrained_weights(hf_tiny_dir):
    model = make_model(ModelConfig(name=str(hf_tiny_dir), dropout=0.1), 50257)
    assert model.config.dropout == 0.1
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045]])
    model.train()
    assert not torch.equal(model(ids), model(ids))  # masks drawn anew each forward
    model.eval()
    assert torch.equal(model(ids), model(ids))
    plain = make_model(ModelConfig(name=str(hf_tiny_dir)), 50257)
    assert plain.config.dropout == 0.0 and torch.equal(plain.eval()(ids), model(ids))  # same weights


@pytest.fixture
def tiny_data(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a} plus 1?", "answer": str(a + 1)}) + "\n" for a in range(20)))
    return data


def test_the_tokenizer_default_is_the_model_folders_own(hf_tiny_dir, gpt2_tokenizer, tiny_data, tmp_path, monkeypatch):
    """config reference: tokenizer null = the model folder's own tokenizer, else $QATUNE_TOKENIZER,
    else the hub's "gpt2". The setting here points nowhere: only the model's own can be used."""
    from qatune.launch import train

    base = export_hf(from_pretrained(hf_tiny_dir), tmp_path / "base", gpt2_tokenizer)
    monkeypatch.setenv("QATUNE_TOKENIZER", str(tmp_path / "no_tokenizer_here"))
    cfg = TrainConfig(
        name="r",
        out_dir=str(tmp_path / "runs"),
        model=ModelConfig(name=str(base)),
        max_steps=1,
        threads=1,
        plots=False,
        tensorboard=False,
    )
    cfg.data.sources, cfg.data.max_len = [str(tiny_data)], 64
    result = train(cfg, progress=False)
    assert result.steps == 1 and (result.export_dir / "tokenizer.json").exists()


def test_every_rank_draws_its_own_dropout_masks(tiny_data, tokenizer_dir, tmp_path):
    """The weights start the same on every rank (seeded alike); the dropout stream must not, or
    data parallelism would apply one mask to every rank's examples."""
    from qatune.data.encode import encode_records
    from qatune.data.example import EncodedExample
    from qatune.data.readers import read_records
    from qatune.data.templates import get_template
    from qatune.methods.sft import SFT
    from qatune.model.tokenizer import load_tokenizer
    from qatune.train.runtime import _Run

    tok = load_tokenizer(tokenizer_dir)
    encodings = encode_records(read_records(str(tiny_data)).records, get_template("plain"), tok)
    examples = [EncodedExample(e.input_ids, e.labels) for e in encodings]
    cfg = TrainConfig(
        out_dir=str(tmp_path),
        model=ModelConfig(init="random", n_layer=1, n_embd=32, n_head=2, n_positions=64, dropout=0.1),
        max_steps=2,
        threads=1,
    )

    def draws(rank: int) -> torch.Tensor:
        torch.manual_seed(cfg.seed)
        model = make_model(cfg.model, len(tok))
        _Run(SFT(examples), model, tok, cfg, False, rank, 2)
        return torch.rand(8)

    assert torch.equal(draws(1), draws(1))  # reproducible per rank (resume relies on it)
    assert not torch.equal(draws(0), draws(1))
