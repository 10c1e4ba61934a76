"""`qatune export` of a reward run: its checkpoints and its run folder come out as the
*ForSequenceClassification the run itself exports (the score head kept), for full fine-tuning and
LoRA, and transformers scores them as qatune's scorer does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qatune.cli import main
from qatune.model.reward import load_reward_model

CONFIG = """
out_dir: {out}
name: {name}
method: reward
tokenizer: {tok}
model: {{name: gpt2, init: random, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64{lora}}}
data: {{sources: [{data}], max_len: 64}}
batch: {{size: 2}}
optim: {{lr: 3e-3, warmup_steps: 1}}
precision: fp32
max_steps: 4
save_every: 2
threads: 1
tensorboard: false
plots: false
"""
LORA = ", lora: {r: 4, alpha: 8}"


@pytest.fixture(scope="module")
def reward_runs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward_export")
    data = root / "pairs.jsonl"
    with data.open("w") as f:
        for a in range(40):
            b = (a * 37) % 100
            f.write(
                json.dumps({"prompt": f"{a} plus {b}?", "chosen": f" {a + b}.", "rejected": f" {a + b + 3}."}) + "\n"
            )
    runs = {}
    for name, lora in (("full", ""), ("lora", LORA)):
        cfg = root / f"{name}.yaml"
        cfg.write_text(CONFIG.format(out=root / "runs", name=name, tok=tokenizer_dir, data=data, lora=lora))
        assert main(["train", str(cfg)]) == 0
        runs[name] = root / "runs" / name
    return runs


def architectures(folder: Path) -> list[str]:
    return json.loads((folder / "config.json").read_text())["architectures"]


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_last_checkpoint_exports_as_the_runs_own_reward_model(reward_runs, tmp_path, kind):
    """The step-4 checkpoint is the final weights: its export equals the run's export tensor for
    tensor (score head included), as a GPT2ForSequenceClassification (LoRA: merged, in both; the
    run's own export used to write the adapters' tensors unmerged, which transformers drops)."""
    run = reward_runs[kind]
    out = tmp_path / "out"
    assert main(["export", str(run / "checkpoints" / "step_00000004"), str(out)]) == 0
    assert architectures(out) == ["GPT2ForSequenceClassification"]
    got, want = load_file(str(out / "model.safetensors")), load_file(str(run / "export" / "model.safetensors"))
    assert got.keys() == want.keys() and "score.weight" in got
    assert not any("lora" in k for k in want)  # before, a LoRA run exported its adapters unmerged
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6 if kind == "lora" else 0)


def test_an_earlier_checkpoint_scores_in_transformers_as_in_qatune(reward_runs, tmp_path, gpt2_tokenizer):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "step2"
    assert main(["export", str(reward_runs["full"] / "checkpoints" / "step_00000002"), str(out)]) == 0
    final = load_file(str(reward_runs["full"] / "export" / "model.safetensors"))
    assert not torch.equal(load_file(str(out / "model.safetensors"))["score.weight"], final["score.weight"])
    ours = load_reward_model(out)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    texts = ["3 plus 11? 14.", "40 plus 80? 123.", "7 plus 59? 66."]
    with torch.no_grad():
        for text in texts:
            ids = gpt2_tokenizer(text)["input_ids"]
            want = hf(torch.tensor([ids])).logits[0, 0]
            got = ours.score_ids([ids], gpt2_tokenizer.eos_token_id)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_reward_run_folder_exports_as_a_reward_model(reward_runs, tmp_path):
    """Before, the run folder came out as a GPT2LMHeadModel without the score head."""
    out = tmp_path / "again"
    assert main(["export", str(reward_runs["full"]), str(out)]) == 0
    assert architectures(out) == ["GPT2ForSequenceClassification"]
    got, want = (
        load_file(str(out / "model.safetensors")),
        load_file(str(reward_runs["full"] / "export" / "model.safetensors")),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_an_adapter_is_not_merged_into_a_reward_model(reward_runs, tmp_path, capsys):
    adapter = reward_runs["lora"] / "adapter"
    assert main(["export", str(reward_runs["full"]), str(tmp_path / "x"), "--adapter", str(adapter)]) != 0
    assert "is a reward model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("source", ["run", "checkpoint"])
def test_the_reward_export_prompts_as_the_run_did(reward_runs, tmp_path, source, gpt2_tokenizer):
    """The exported tokenizer carries the run's template as its chat template and max_len as its
    context, as a language model's export does: a user scoring through transformers formats the
    prompt the way the reward model was trained on. Before, a reward export wrote neither."""
    from transformers import AutoTokenizer

    from qatune.data.templates import get_template

    if source == "run":
        folder = reward_runs["full"] / "export"
    else:
        folder = tmp_path / "step4"
        assert main(["export", str(reward_runs["full"] / "checkpoints" / "step_00000004"), str(folder)]) == 0
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.model_max_length == 64
    messages = [{"role": "user", "content": "3 plus 11?"}]
    want = get_template("plain").render_prompt("3 plus 11?")
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
