"""Shared fixtures: where the shared data is, the real GPT-2 tokenizer, tiny random models.

The shared folder is $QATUNE_SHARED, else ../shared beside the checkout (CI, this project's
machines); when neither exists (a fresh clone) it is tests/fixtures/shared, which ships the GPT-2
tokenizer files and small samples of every data set, so the whole suite runs with nothing skipped
(no test needs the full sets; the tests that count over them check their counts against the files
they are given). QATUNE_REQUIRE_SHARED=1 (CI) makes the full shared folder a requirement: a run
that would fall back to the samples fails instead.
"""

from __future__ import annotations

import os
from pathlib import Path

# Nothing in the suite may reach the network: the hub libraries read their cache only, and qatune
# never probes the hub (tests that need "online" or "unreachable" fake that boundary).
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from qatune.model.gpt2 import GPT2, GPT2Config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE_SHARED = REPO / "tests" / "fixtures" / "shared"


def find_shared() -> Path:
    for candidate in (os.environ.get("QATUNE_SHARED"), REPO.parent / "shared"):
        if candidate and (Path(candidate) / "data").is_dir():
            return Path(candidate)
    return FIXTURE_SHARED


SHARED = find_shared()
TOKENIZER_DIR = SHARED / "tokenizer" / "gpt2"
DATA_DIR = SHARED / "data"
# Code that finds the tokenizer through the setting (and the `qatune` subprocesses tests start).
os.environ.setdefault("QATUNE_TOKENIZER", str(TOKENIZER_DIR))


def check_required() -> None:
    if SHARED == FIXTURE_SHARED and os.environ.get("QATUNE_REQUIRE_SHARED"):
        pytest.fail("QATUNE_REQUIRE_SHARED is set but no shared folder was found ($QATUNE_SHARED, ../shared)")


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    check_required()
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def gpt2_tokenizer(tokenizer_dir):
    from qatune.model.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data sets: the full ones, or the samples in tests/fixtures/shared."""
    check_required()
    return DATA_DIR


TINY = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)


@pytest.fixture
def tiny_model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(TINY)


@pytest.fixture(scope="session")
def hf_tiny_dir(tmp_path_factory) -> Path:
    """A folder written by transformers itself from a tiny random GPT2LMHeadModel."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = HFConfig(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=128,
        vocab_size=50257,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    # Random biases and LayerNorm affine too, so a mapping mistake cannot hide behind zeros/ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def make_tiny_run(hf_tiny_dir, gpt2_tokenizer, tmp_path_factory):
    """make_tiny_run(template) -> a run folder whose export/ holds the tiny transformers model, the
    GPT-2 tokenizer and a qatune.json with that template and max_len 128."""
    import json

    from qatune.data.templates import get_template
    from qatune.model.hf_io import export_hf, from_pretrained

    def make(template: str):
        run = tmp_path_factory.mktemp(f"run_{template}")
        meta = {"template": get_template(template).to_dict(), "max_len": 128}
        export_hf(from_pretrained(hf_tiny_dir), run / "export", gpt2_tokenizer, {"qatune.json": json.dumps(meta)})
        return run

    return make


@pytest.fixture(scope="session")
def facts(tmp_path_factory) -> dict:
    """The RL tests' SFT starting point on the demo's facts task (tests/rl_facts.py), built once."""
    from tests.rl_facts import make_facts

    return make_facts(tmp_path_factory.mktemp("rl"))
