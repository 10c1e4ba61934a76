"""Every export carries a model card (README.md, as the Hugging Face hub reads it): the base model,
the data sources and counts, the method and its settings, the final metrics of metrics.jsonl —
for `qatune train`'s export (an LM and a reward model) and for `qatune export` of a run and of one
of its checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from qatune.cli import main
from qatune.config import load_config
from qatune.methods.config import TrainConfig
from qatune.train.metrics import read_metrics
from qatune.train.model_card import base_model, hub_datasets, read_front_matter

CONFIG = """
out_dir: {out}
model: {{name: {model}}}
data: {{sources: [{data}], max_len: 64}}
batch: {{size: 4}}
eval: {{fraction: 0.1, every: 0, batch_size: 8}}
max_steps: 2
save_every: 1
threads: 1
tensorboard: false
plots: false
"""


def _write(root: Path) -> tuple[Path, Path]:
    qa, pairs = root / "qa.jsonl", root / "pairs.jsonl"
    with qa.open("w") as f, pairs.open("w") as g:
        for a in range(30):
            f.write(json.dumps({"question": f"What is {a} plus 2?", "answer": str(a + 2)}) + "\n")
            g.write(json.dumps({"prompt": f"{a} + 2?", "chosen": str(a + 2), "rejected": str(a + 3)}) + "\n")
    return qa, pairs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hf_tiny_dir):
    """An SFT and a reward run from a base folder whose own card names its hub base and license."""
    from qatune.launch import train

    root = tmp_path_factory.mktemp("card")
    qa, pairs = _write(root)
    base = root / "base"
    shutil.copytree(hf_tiny_dir, base)
    (base / "README.md").write_text("---\nbase_model: openai-community/gpt2\nlicense: mit\n---\n# a base\n")
    config = root / "run.yaml"
    config.write_text(CONFIG.format(out=root / "runs", model=base, data=qa))
    sft = train(load_config(TrainConfig, config, ["name=sft"]), progress=False)
    reward_cfg = load_config(TrainConfig, config, ["name=rm", "method=reward", f"data.sources=[{pairs}]"])
    reward = train(reward_cfg, progress=False)
    return {"root": root, "base": base, "qa": qa, "pairs": pairs, "sft": sft.run_dir, "rm": reward.run_dir}


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    return read_front_matter(folder / "README.md"), text.split("\n---\n", 1)[1]


def _metric(body: str, key: str) -> float:
    row = next(line for line in body.splitlines() if f"| `{key}` |" in line)
    return float(row.rsplit("|", 2)[1])


def test_an_sft_export_has_a_card_with_base_data_method_and_final_metrics(runs):
    front, body = _card(runs["sft"] / "export")
    assert front["library_name"] == "transformers"
    assert front["base_model"] == "openai-community/gpt2" and front["license"] == "mit"  # from the base's card
    assert "sft" in front["tags"] and front["pipeline_tag"] == "text-generation"
    assert str(runs["qa"]) in body
    assert "30 records read; 30 kept after truncation" in body
    settings = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert settings["method"] == "sft" and settings["max_steps"] == 2
    picked = yaml.safe_load((runs["sft"] / "config.yaml").read_text())["precision"]  # what auto picked here
    assert settings["precision"] == picked and picked in ("fp32", "bf16")
    assert settings["model"]["name"] == str(runs["base"])
    last = read_metrics(runs["sft"])[-1]
    assert last["step"] == 2 and "Final metrics (step 2)" in body
    for key in ("eval_loss", "eval_ppl", "loss"):
        assert _metric(body, key) == pytest.approx(last[key], rel=1e-3), key


def test_a_reward_model_export_has_its_card(runs):
    front, body = _card(runs["rm"] / "export")
    assert "reward" in front["tags"] and front["pipeline_tag"] == "text-classification"
    assert "30 pairs read" in body
    last = read_metrics(runs["rm"])[-1]
    for key in ("eval_loss", "eval_accuracy", "loss"):
        assert _metric(body, key) == pytest.approx(last[key], rel=1e-3), key
    assert "center_coefficient" in body  # the method's own settings section


def test_qatune_export_of_a_run_keeps_its_card_and_a_checkpoint_gets_one_from_its_run(runs, tmp_path):
    assert main(["export", str(runs["sft"]), str(tmp_path / "whole")]) == 0
    assert (tmp_path / "whole" / "README.md").read_text() == (runs["sft"] / "export" / "README.md").read_text()

    checkpoint = runs["sft"] / "checkpoints" / "step_00000001"
    assert main(["export", str(checkpoint), str(tmp_path / "step1")]) == 0
    front, body = _card(tmp_path / "step1")
    assert front["base_model"] == "openai-community/gpt2"
    assert "Final metrics (step 1)" in body and "30 records read" in body
    first = read_metrics(runs["sft"])[0]
    assert first["step"] == 1 and _metric(body, "loss") == pytest.approx(first["loss"], rel=1e-3)


def test_the_base_model_and_its_license_by_how_the_model_was_named(tmp_path):
    cfg = TrainConfig()
    assert base_model(cfg) == ("gpt2", "mit")
    cfg.model.name, cfg.model.init = "gpt2", "random"
    assert base_model(cfg) == (None, None)  # fresh weights: no base
    cfg.model.name, cfg.model.init = str(tmp_path), "pretrained"
    assert base_model(cfg) == (None, None)  # a folder without a card


def test_the_card_lists_hub_data_sets_by_name_and_local_files_in_its_text(tmp_path):
    local = tmp_path / "mine.jsonl"
    local.write_text("{}\n")
    sources = ["tatsu-lab/alpaca", {"hub": "openai/gsm8k", "config": "main"}, str(local), "org/set:test"]
    assert hub_datasets(sources) == ["tatsu-lab/alpaca", "openai/gsm8k", "org/set"]
