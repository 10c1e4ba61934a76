"""Gradient dynamics watched during training: prompt-token loss, per-layer norms, clip rate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.test_train_step import SMALL, examples_of_varied_lengths
from tests.tiny_models import FAMILIES, tiny_lm

from qatune.data.batching import collate
from qatune.data.example import IGNORE
from qatune.launch import fit
from qatune.methods.config import TrainConfig
from qatune.methods.sft.monitor import prompt_targets
from qatune.methods.sft.step import train_step
from qatune.model.gpt2 import GPT2
from qatune.train.step import Precision


def direct_prompt_loss(model: GPT2, examples) -> float:
    """Mean cross-entropy over prompt tokens, each example alone, full logits."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        targets = [nxt if label == IGNORE else IGNORE for nxt, label in zip(ex.input_ids[1:], ex.labels[1:])]
        logits = model.lm_head(model(ids))[0, :-1]
        t = torch.tensor(targets)
        total += float(F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="sum").detach())
        count += int((t != IGNORE).sum())
    return total / count


@pytest.mark.parametrize("packed", [True, False])
def test_prompt_loss_equals_a_direct_count(packed, monkeypatch):
    monkeypatch.setattr("qatune.methods.sft.monitor.MONITOR_LABELS_PER_PROMPT", 1)  # 63 prompt <= 141 labels: all
    torch.manual_seed(0)
    model = GPT2(SMALL).double()
    exs = examples_of_varied_lengths(6)
    rows = [exs[:3], exs[3:]] if packed else [[e] for e in exs]
    batch = collate(rows, pad_id=0)
    n_prompt = sum(sum(1 for label in e.labels[1:] if label == IGNORE) for e in exs)
    assert int((prompt_targets(batch) != IGNORE).sum()) == n_prompt
    stats = train_step(model, [batch], Precision("fp32", torch.device("cpu")), measure_prompt_loss=True)
    assert stats.prompt_tokens == n_prompt
    assert stats.prompt_loss == pytest.approx(direct_prompt_loss(model, exs), rel=1e-9)
    assert train_step(model, [batch], Precision("fp32", torch.device("cpu"))).prompt_loss is None


# the layers the norms are grouped by, per family (`qatune.train.grad_norms.layer_of`)
LAYERS = {
    "gpt2": {"embeddings", "h.0", "h.1", "ln_f"},
    "llama": {"embeddings", "layers.0", "layers.1", "norm", "output"},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fit_logs_layer_norms_clip_rate_and_prompt_loss(tmp_path, family):
    model = tiny_lm(family)
    cfg = TrainConfig(name="mon", out_dir=str(tmp_path), max_steps=6, tensorboard=False, plots=True, export=False)
    cfg.batch.size, cfg.batch.unit = 2, "examples"
    cfg.monitor.every, cfg.monitor.clip_window = 2, 3
    cfg.optim.grad_clip, cfg.optim.warmup_steps, cfg.eval.fraction = 0.5, 0, 0.0
    result = fit(model, None, examples_of_varied_lengths(12), cfg, progress=False)
    records = result.history
    watched = [r["step"] for r in records if "grad_norm_layers" in r]
    assert watched == [1, 2, 4, 6]
    for r in records:
        clipped = [q["clipped"] for q in records if r["step"] - 3 < q["step"] <= r["step"]]
        assert r["clip_rate"] == pytest.approx(sum(clipped) / len(clipped))
        if "grad_norm_layers" in r:
            layers = r["grad_norm_layers"]
            assert set(layers) == LAYERS[family]
            # the per-layer norms add up (in squares) to the global pre-clip norm
            assert math.sqrt(sum(v * v for v in layers.values())) == pytest.approx(r["grad_norm"], rel=1e-5)
            assert r["prompt_loss"] > 0
    assert (tmp_path / "mon" / "plots" / "grad_norm_layers.png").exists()


def test_prompt_loss_samples_at_most_an_eighth_of_the_label_count():
    """Long prompts, short answers: the monitor scores a systematic sample of the prompt positions,
    at most an eighth as many as the batch has labels, so a monitored step stays cheap."""
    from qatune.data.example import EncodedExample
    from qatune.methods.sft.monitor import sample_targets

    t = torch.tensor([[IGNORE, 5, 6, IGNORE, 7], [8, IGNORE, 9, 10, 11]])
    assert sample_targets(t, 2).tolist() == [[IGNORE, 5, IGNORE, IGNORE, 7], [IGNORE, IGNORE, 9, IGNORE, 11]]
    assert torch.equal(sample_targets(t, 1), t)

    exs = [EncodedExample(list(range(1, 61)), [IGNORE] * 57 + [7, 8, 9], f"ex{i}") for i in range(4)]
    batch = collate([exs[:2], exs[2:]], pad_id=0)
    torch.manual_seed(0)
    stats = train_step(GPT2(SMALL), [batch], Precision("fp32", torch.device("cpu")), measure_prompt_loss=True)
    assert stats.label_tokens == 12 and 0 < stats.prompt_tokens <= 1
    assert math.isfinite(stats.prompt_loss)
