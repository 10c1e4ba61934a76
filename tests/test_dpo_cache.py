"""The DPO reference cache (`reference_logps.pt`) belongs to the reference it was computed with:
a run started again under the same name (its first run stopped before any checkpoint) with
another model, or other settings the values depend on, recomputes them and says why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tests.test_preference_train import CONFIG, write_pairs

from qatune.config import load_config
from qatune.launch import train
from qatune.methods.config import TrainConfig
from qatune.methods.dpo.method import REFERENCE_CACHE
from qatune.runs import CHECKPOINTS_DIR


@pytest.fixture
def config(tmp_path, tokenizer_dir) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "runs", tok=tokenizer_dir, data=write_pairs(tmp_path / "pairs.jsonl")))
    return path


def dpo(config: Path, name: str, *overrides: str) -> Path:
    """One DPO step with the precomputed reference; then, as if the run had been killed before its
    first checkpoint, no checkpoint is left (a fresh run may start in the folder again)."""
    args = ["method=dpo", "dpo.precompute_reference=true", "max_steps=1", "export=false", f"name={name}", *overrides]
    result = train(load_config(TrainConfig, config, args), progress=False)
    shutil.rmtree(result.run_dir / CHECKPOINTS_DIR)
    return result.run_dir


def cached(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / REFERENCE_CACHE, weights_only=True)["logps"]


def test_another_model_under_the_same_run_name_recomputes_the_reference(config, capsys):
    run_a = dpo(config, "same", "seed=0")  # model A: random weights from seed 0
    a = cached(run_a)
    capsys.readouterr()
    run_b = dpo(config, "same", "seed=1")  # model B: other weights, same run name
    b = cached(run_b)
    err = capsys.readouterr().err
    own = cached(dpo(config, "b_alone", "seed=1"))  # B's own values, in a folder of its own
    assert not torch.allclose(a, own)
    assert torch.equal(b, own)  # not A's
    assert f"{REFERENCE_CACHE} was computed for another reference weights: computing it again" in err


def test_the_same_reference_reuses_the_cache_and_another_setting_recomputes_it(config, capsys):
    run = dpo(config, "again", "seed=0")
    first = (run / REFERENCE_CACHE).read_bytes()
    capsys.readouterr()
    dpo(config, "again", "seed=0")
    assert "computing it again" not in capsys.readouterr().err
    assert (run / REFERENCE_CACHE).read_bytes() == first  # read back, not rewritten
    dpo(config, "again", "seed=0", "data.max_len=48")  # the same pairs (all short), another max_len
    assert "computed for another max_len: computing it again" in capsys.readouterr().err
