"""`method: dpo` and `method: reward` on the shared runtime: the first DPO step, accumulation
invariance, the precomputed reference, the reward model's export against its own evaluation,
`qatune eval` / `qatune score` on a reward model, and the LoRA reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.tolerances import assert_weights_match, lrs_of

from qatune.cli import main
from qatune.config import load_config
from qatune.methods.config import TrainConfig
from qatune.train.metrics import read_metrics

CONFIG = """
out_dir: {out}
tokenizer: {tok}
model: {{name: gpt2, init: random, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64}}
data: {{sources: [{data}], max_len: 64}}
batch: {{size: 4, accumulation: 1}}
optim: {{lr: 3e-3, warmup_steps: 2, weight_decay: 0.0}}
eval: {{fraction: 0.1, every: 3, batch_size: 4}}
dpo: {{beta: 0.5}}
max_steps: 6
save_every: 3
threads: 1
precision: fp32  # the comparisons below are fp32's (auto may pick bf16 on this CPU)
tensorboard: false
plots: false
"""


def write_pairs(path: Path, n: int = 60) -> Path:
    with path.open("w") as f:
        for a in range(n):
            b = (a * 37) % 100
            row = {"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}.", "rejected": f"It is {a + b + 7}."}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("pref")
    data = write_pairs(root / "pairs.jsonl")
    cfg = root / "run.yaml"
    cfg.write_text(CONFIG.format(out=root / "runs", tok=tokenizer_dir, data=data))
    return root, cfg


def train(cfg_path: Path, name: str, *overrides: str):
    from qatune.launch import train as run

    cfg = load_config(TrainConfig, cfg_path, [f"name={name}", *overrides])
    return run(cfg, progress=False)


@pytest.fixture(scope="module")
def dpo_runs(setup):
    root, cfg = setup
    train(cfg, "dpo", "method=dpo")
    train(cfg, "dpo_accumulated", "method=dpo", "batch.size=2", "batch.accumulation=2")
    train(cfg, "dpo_precomputed", "method=dpo", "dpo.precompute_reference=true")
    train(cfg, "dpo_lora", "method=dpo", "model.lora={r: 4, alpha: 8}")  # reference: the base, adapters off
    return root / "runs"


@pytest.mark.parametrize("name", ["dpo", "dpo_lora"])
def test_first_dpo_step_is_log2_with_zero_reward_accuracy(dpo_runs, name):
    first = read_metrics(dpo_runs / name)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # pi == pi_ref: sigma(0) for every pair
    assert first["reward_accuracy"] == 0.0 and first["margin"] == 0.0 and first["logratio"] == 0.0
    assert first["pairs"] == 4 and first["logp_chosen"] < 0
    last = read_metrics(dpo_runs / name)[-1]
    assert last["eval_pairs"] == 6 and 0.0 <= last["eval_reward_accuracy"] <= 1.0
    assert last["reward_chosen"] != 0.0  # the policy moved away from its reference


@pytest.mark.parametrize("other", ["dpo_accumulated", "dpo_precomputed"])
def test_accumulation_and_precomputed_reference_give_the_same_run(dpo_runs, other):
    """(4 pairs x 1) == (2 pairs x 2 micro-batches); reference log-probs cached before training
    == a reference forward in every step."""
    a, b = read_metrics(dpo_runs / "dpo"), read_metrics(dpo_runs / other)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "reward_accuracy", "margin", "logp_chosen", "eval_loss", "eval_margin"):
            if key in ra:  # fp32 means of O(1) values: rounding ~1e-6 (measured <= 2e-6 rel on 3 kernel sets)
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), (other, ra["step"], key)
    wa = load_file(str(dpo_runs / "dpo" / "export" / "model.safetensors"))
    wb = load_file(str(dpo_runs / other / "export" / "model.safetensors"))
    assert_weights_match(wa, wb, lrs_of(a))
    assert (dpo_runs / other / "reference_logps.pt").exists() == (other == "dpo_precomputed")


def test_dpo_export_is_a_transformers_lm(dpo_runs):
    from transformers import GPT2LMHeadModel

    export = dpo_runs / "dpo" / "export"
    assert isinstance(GPT2LMHeadModel.from_pretrained(export), GPT2LMHeadModel)
    meta = json.loads((export / "qatune.json").read_text())
    assert meta["method"] == "dpo" and meta["dpo"]["beta"] == 0.5 and meta["truncation"] == "cut_pair"


@pytest.fixture(scope="module")
def reward_run(setup):
    root, cfg = setup
    train(cfg, "rm", "method=reward")
    return root


def held_out_pairs(root: Path, tokenizer):
    from qatune.data.pipeline import DataConfig
    from qatune.data.plan import split_holdout
    from qatune.data.preference.pipeline import load_pairs

    pairs = load_pairs(DataConfig(sources=[str(root / "pairs.jsonl")], max_len=64), tokenizer).pairs
    _, held = split_holdout(len(pairs), 0.1, 500, 0)
    return [pairs[i] for i in held], held


def test_reward_export_scores_reproduce_the_runs_own_evaluation(reward_run, gpt2_tokenizer):
    """transformers' GPT2ForSequenceClassification on the export, EOS-padded batches, gives the
    held-out accuracy and margin the run logged at its last step."""
    from transformers import AutoModelForSequenceClassification

    root = reward_run
    last = read_metrics(root / "runs" / "rm")[-1]
    hf = AutoModelForSequenceClassification.from_pretrained(root / "runs" / "rm" / "export").eval()
    assert hf.config.pad_token_id == gpt2_tokenizer.eos_token_id and hf.config.num_labels == 1
    pairs, _ = held_out_pairs(root, gpt2_tokenizer)
    seqs = [p.prompt_ids + r for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [gpt2_tokenizer.eos_token_id] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        scores = hf(input_ids=ids).logits.squeeze(-1)
    chosen, rejected = scores[0::2], scores[1::2]
    assert float((chosen > rejected).double().mean()) == pytest.approx(last["eval_accuracy"], abs=1e-9)
    assert float((chosen - rejected).mean()) == pytest.approx(last["eval_margin"], abs=1e-5)
    assert float(chosen.mean()) == pytest.approx(last["eval_score_chosen"], abs=1e-5)


def test_eval_and_score_cli_on_a_reward_model(reward_run, gpt2_tokenizer, tmp_path, capsys):
    from qatune.model.reward import load_reward_model

    root = reward_run
    pairs, held = held_out_pairs(root, gpt2_tokenizer)
    lines = (root / "pairs.jsonl").read_text().splitlines()
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(lines[i] + "\n" for i in held))
    rc = main(["eval", str(root / "runs" / "rm"), str(heldout), "--out", str(tmp_path / "ev")])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    last = read_metrics(root / "runs" / "rm")[-1]
    assert report["pairs"] == len(held) and report["accuracy"] == pytest.approx(last["eval_accuracy"], abs=1e-9)
    assert report["margin"]["mean"] == pytest.approx(last["eval_margin"], abs=1e-5)

    out = tmp_path / "scores.jsonl"
    assert main(["score", str(root / "runs" / "rm"), str(heldout), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    rm = load_reward_model(root / "runs" / "rm" / "export")
    eos = gpt2_tokenizer.eos_token_id
    want = rm.score_ids([p.prompt_ids + p.chosen_ids for p in pairs], eos)
    assert [r["where"] for r in rows] == [f"{heldout}:{k}" for k in range(1, len(held) + 1)]
    torch.testing.assert_close(torch.tensor([r["chosen"] for r in rows]), want)

    qa = tmp_path / "qa.jsonl"  # prompt/response records: one score each, the chosen answer's
    qa.write_text(
        "".join(
            json.dumps({"prompt": json.loads(lines[i])["prompt"], "response": json.loads(lines[i])["chosen"]}) + "\n"
            for i in held
        )
    )
    assert main(["score", str(root / "runs" / "rm"), str(qa), "--out", str(tmp_path / "qa_scores.jsonl")]) == 0
    single = [json.loads(x)["score"] for x in (tmp_path / "qa_scores.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(single), want)

    capsys.readouterr()
    rc = main(["score", str(root / "runs" / "rm"), str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.jsonl")])
    assert rc == 2 and not (tmp_path / "x.jsonl").exists()
    assert capsys.readouterr().err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"  # a malformed pair: one line naming file, line and field; nothing written
    bad.write_text(lines[held[0]] + "\n" + json.dumps({"prompt": "Q", "chosen": "A"}) + "\n")
    rc = main(["score", str(root / "runs" / "rm"), str(bad), "--out", str(tmp_path / "y.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{bad}:2: field 'rejected' is missing" in err
    assert not (tmp_path / "y.jsonl").exists()
