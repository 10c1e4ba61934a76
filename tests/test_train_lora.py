"""`qatune train` with `model.lora`: only the adapters train and are checkpointed, a SIGKILLed run
resumes bit-identically, the run's adapter is one peft loads, and the export is the merged model."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from qatune.train.checkpoints import list_checkpoints
from test_train_resume import KILL_AT_STEP_8, run_cli

pytestmark = pytest.mark.slow
ADAPTED = ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")  # attn.c_proj stays as the base's

CONFIG = """
out_dir: {out}
tokenizer: {tok}
model: {{name: {base}, lora: {{r: 4, alpha: 8, dropout: 0.1, targets: [attn.c_attn, mlp.c_fc, mlp.c_proj]}}}}
data: {{sources: [{data}], max_len: 64}}
batch: {{size: 4, accumulation: 2}}
optim: {{lr: 1e-2, warmup_steps: 3}}
eval: {{fraction: 0.1, every: 4}}
max_steps: 10
save_every: 5
threads: 1
tensorboard: false
plots: false
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir, hf_tiny_dir):
    """One LoRA run straight through, one killed at step 8 and resumed from its step-5 checkpoint."""
    root = tmp_path_factory.mktemp("lora_runs")
    data = root / "qa.jsonl"
    with data.open("w") as f:
        for a in range(120):
            f.write(json.dumps({"question": f"What is {a} plus {a % 7}?", "answer": f"It is {a + a % 7}."}) + "\n")
    cfg = root / "run.yaml"
    cfg.write_text(CONFIG.format(out=root / "runs", tok=tokenizer_dir, base=hf_tiny_dir, data=data))
    straight = run_cli("train", str(cfg), "name=straight", "--no-progress")
    assert straight.returncode == 0, straight.stderr
    killed = run_cli("train", str(cfg), "name=killed", "--no-progress", killer=KILL_AT_STEP_8)
    assert killed.returncode == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(root / "runs" / "killed" / "checkpoints")] == [5]
    resumed = run_cli("train", str(cfg), "name=killed", "--no-progress", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return root / "runs"


def test_only_adapters_are_trained_and_checkpointed(runs, hf_tiny_dir):
    run = runs / "straight"
    adapters = {f"h.{i}.{t}.lora_{ab}.weight" for i in range(2) for t in ADAPTED for ab in "AB"}
    state = torch.load(run / "checkpoints" / "step_00000010" / "state.pt", weights_only=False)
    assert set(state["model"]) == adapters  # no base weight in the checkpoint
    assert state["optimizer"] is None  # the last step's: no step follows it
    state = torch.load(run / "checkpoints" / "step_00000005" / "state.pt", weights_only=False)
    assert set(state["model"]) == adapters
    names = [n for group in state["optimizer"]["param_groups"] for n in group["names"]]
    assert set(names) == adapters and len(state["optimizer"]["state"]) == len(adapters)
    # The export is the merged model: frozen tensors are the base's, bit for bit; adapted ones moved.
    base, merged = load_file(hf_tiny_dir / "model.safetensors"), load_file(run / "export" / "model.safetensors")
    for key, tensor in merged.items():
        adapted = any(f".{t}.weight" in key for t in ADAPTED)
        assert torch.equal(tensor, base[key]) != adapted, key
    # It trained (slowly: the fixture's LayerNorm gains are ~N(0, 0.1), so the adapters' inputs are small).
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] - 0.02
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals == sorted(evals, reverse=True) and evals[-1] < evals[0]


def test_peft_loads_the_run_adapter_and_equals_the_merged_export(runs, hf_tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs / "straight"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_tiny_dir.resolve()) and config["r"] == 4
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_tiny_dir), run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "export").eval()
    base = AutoModelForCausalLM.from_pretrained(hf_tiny_dir).eval()
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, before = peft_model(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # merged vs adapter in fp32: measured <= 3e-8
    assert (got - before).abs().max() > 1e-2  # the adapter really changes the model


def test_sigkill_then_resume_with_lora_is_bit_identical(runs):
    for folder, name in (("adapter", "adapter_model.safetensors"), ("export", "model.safetensors")):
        a, b = load_file(runs / "straight" / folder / name), load_file(runs / "killed" / folder / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), folder
    metrics = [
        [json.loads(x) for x in (runs / r / "metrics.jsonl").read_text().splitlines()] for r in ("straight", "killed")
    ]
    assert [m["step"] for m in metrics[1]] == list(range(1, 11))
    for ma, mb in zip(*metrics):
        assert (ma["loss"], ma["grad_norm"], ma.get("eval_loss")) == (mb["loss"], mb["grad_norm"], mb.get("eval_loss"))


def test_a_lora_checkpoint_exports_as_the_merged_model(runs, tmp_path):
    """`qatune export <run>/checkpoints/step_*`: the base rebuilt, the adapters loaded and merged."""
    from qatune.cli import main

    assert main(["export", str(runs / "straight" / "checkpoints" / "step_00000010"), str(tmp_path / "out")]) == 0
    a = load_file(runs / "straight" / "export" / "model.safetensors")
    b = load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
