"""`qatune train` end to end on a tiny model: the run folder, its metrics, plots and export."""

from __future__ import annotations

import json

import pytest
import torch

from qatune.cli import main
from qatune.methods.sft.step import train_step
from qatune.model.hf_io import from_pretrained
from qatune.train.step import Precision

pytestmark = pytest.mark.slow

FIELDS = {"step", "loss", "lr", "grad_norm", "clipped", "tokens", "label_tokens", "tokens_per_s", "elapsed"}


@pytest.fixture
def config(tmp_path, tokenizer_dir):
    data = tmp_path / "qa.jsonl"
    with data.open("w") as f:
        for a in range(60):
            f.write(json.dumps({"instruction": f"Add {a} and 3.", "output": f"{a + 3}" + " !" * (a % 7)}) + "\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"name: e2e\nout_dir: {tmp_path / 'runs'}\ntokenizer: {tokenizer_dir}\n"
        "model: {name: gpt2, init: random, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64}\n"
        f"data: {{sources: [{data}], template: alpaca, max_len: 64}}\n"
        "batch: {size: 8, accumulation: 1}\noptim: {lr: 1e-3, warmup_steps: 2, grad_clip: 0.5}\n"
        "eval: {fraction: 0.2, every: 3}\nmax_steps: 6\nsave_every: 2\nkeep_checkpoints: 2\nthreads: 1\n"
    )
    return cfg


def test_run_folder(config, tmp_path, capsys):
    assert main(["train", str(config), "optim.lr=2e-3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "trained 6 steps" in out and "held-out response loss" in out
    run = tmp_path / "runs" / "e2e"
    assert "lr: 0.002" in (run / "config.yaml").read_text()  # the resolved config, override applied
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r.keys() >= FIELDS for r in records)
    assert [r["lr"] for r in records[:2]] == pytest.approx([1e-3, 2e-3])
    assert all(r["clipped"] == (r["grad_norm"] > 0.5) for r in records)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval_ppl"] == pytest.approx(torch.tensor(evals[-1]["eval_loss"]).exp().item(), rel=1e-5)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    plots = {"loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "clip_rate.png", "grad_norm_layers.png"}
    assert {p.name for p in (run / "plots").iterdir()} == plots
    assert any((run / "tensorboard").iterdir())
    meta = json.loads((run / "export" / "qatune.json").read_text())
    assert meta["template"]["name"] == "alpaca" and meta["max_len"] == 64 and meta["steps"] == 6
    assert meta["truncation"] == "cut_response"  # eval reuses the training policy
    assert meta["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    tok_config = json.loads((run / "export" / "tokenizer_config.json").read_text())
    assert tok_config["model_max_length"] == 64 and "qatune template alpaca" in tok_config["chat_template"]


def test_export_loads_in_transformers_with_the_same_logits(config, tmp_path):
    from transformers import GPT2LMHeadModel

    assert main(["train", str(config), "max_steps=2", "--no-progress"]) == 0
    export = tmp_path / "runs" / "e2e" / "export"
    hf = GPT2LMHeadModel.from_pretrained(export).eval()
    ours = from_pretrained(export).eval()
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045]])
    with torch.no_grad():  # two fp32 implementations of the same forward, O(1) logits: rounding ~1e-7
        assert torch.allclose(hf(ids).logits, ours.lm_head(ours(ids)), atol=1e-4)


def fp16_matches_fp32(model, batch, precision) -> None:
    """fp16 with loss scaling must train like fp32: the backward pass really ran on the scaled loss
    (the stored gradients are scale x the fp32 ones), and the update `optimizer_step` makes after
    unscaling equals fp32's (SGD with lr 1: the update is minus the gradient)."""
    import copy

    from qatune.train.step import optimizer_step

    cpu = torch.device("cpu")
    ref = copy.deepcopy(model)
    train_step(ref, [batch], Precision("fp32", cpu))
    ref_grads = [p.grad.clone() for p in ref.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    train_step(model, [batch], precision)
    scale = precision.scaler.get_scale()
    assert scale > 1
    for p, g in zip(model.parameters(), ref_grads):
        assert torch.linalg.vector_norm(p.grad / scale - g) <= 2e-2 * torch.linalg.vector_norm(g) + 1e-8
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    update = optimizer_step(model, optimizer, None, precision, grad_clip=0.0)
    assert not update.skipped
    for p, p0, g in zip(model.parameters(), start, ref_grads):
        assert torch.linalg.vector_norm((p0 - p.detach()) - g) <= 2e-2 * torch.linalg.vector_norm(g) + 1e-8


def packed_batch():
    from qatune.data.example import IGNORE, EncodedExample
    from qatune.data.plan import make_batch

    exs = [EncodedExample(list(range(100, 140)), [IGNORE] * 20 + list(range(120, 140))) for _ in range(3)]
    return make_batch(exs, "packed", 128, 0)


def test_fp16_gradients_unscaled_equal_fp32(tiny_model):
    fp16_matches_fp32(tiny_model, packed_batch(), Precision("fp16", torch.device("cpu")))


def test_the_fp16_check_catches_a_scaler_that_does_not_scale(tiny_model):
    """The mutant of the fp16 path: the loss goes into backward unscaled (an identity `scale`), the
    update is unscaled anyway. The loss, finite gradients and a scale above 1 all look right; the
    comparison with fp32 does not."""

    class IdentityScaler(torch.amp.GradScaler):
        def scale(self, outputs):
            return outputs

    precision = Precision("fp16", torch.device("cpu"))
    precision.scaler = IdentityScaler("cpu")
    batch = packed_batch()
    loss = train_step(tiny_model, [batch], precision).loss
    assert torch.isfinite(torch.tensor(loss)) and precision.scaler.get_scale() > 1  # the old checks pass
    tiny_model.zero_grad()
    with pytest.raises(AssertionError):
        fp16_matches_fp32(tiny_model, batch, precision)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_mixed_precision_step_close_to_fp32(name, tiny_model):
    from qatune.data.example import IGNORE, EncodedExample
    from qatune.data.plan import make_batch

    exs = [EncodedExample(list(range(100, 140)), [IGNORE] * 20 + list(range(120, 140))) for _ in range(3)]
    batch = make_batch(exs, "packed", 128, 0)
    cpu = torch.device("cpu")
    ref = train_step(tiny_model, [batch], Precision("fp32", cpu)).loss
    tiny_model.zero_grad()
    precision = Precision(name, cpu)
    got = train_step(tiny_model, [batch], precision).loss
    assert got == pytest.approx(ref, rel=2e-2)
    grads = [p.grad for p in tiny_model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if name == "fp16":
        assert precision.scaler is not None and precision.scaler.get_scale() > 1  # the loss was scaled
