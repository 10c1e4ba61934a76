"""Compute plan against PyTorch's FLOP counter, and the per-token table by sequence length."""

from __future__ import annotations

import pytest

from qatune.analysis.accelerators import ACCELERATORS, get_accelerator, peak_tflops
from qatune.analysis.compute import plan_compute, seq_len_table, step_time
from qatune.analysis.measure import compare, measure_step
from qatune.analysis.setup import PlanSetup
from qatune.model.gpt2 import SIZES, GPT2Config

TINY = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attention", ["flash", "math"])
def test_flops_within_2_percent_of_flop_counter(attention, checkpointing):
    s = PlanSetup(
        TINY,
        seq_len=96,
        micro_batch=2,
        precision="fp32",
        attention=attention,
        checkpointing=checkpointing,
        label_fraction=0.3,
        device="cpu",
    )
    m = measure_step(s)
    plan = plan_compute(s)
    if attention == "math":  # the counter sees SDPA's bmm's: dense + attention + head (+ recompute)
        assert m.attention_counted == "math"
        assert plan.hardware_flops == pytest.approx(m.flops, rel=0.02)
    else:  # CPU's flash kernel has no FLOP formula in the counter: it counts dense + head only
        assert m.attention_counted == "none"
        attention_flops = plan.attention + (4 * 2 * 96 * 64 * s.tokens if checkpointing else 0)
        assert plan.hardware_flops - attention_flops == pytest.approx(m.flops, rel=0.02)
    flops_row = next(r for r in compare(s, m) if r["name"].startswith("FLOPs"))
    assert flops_row["ratio"] == pytest.approx(1.0, abs=0.02)


def test_lm_head_only_on_labelled_tokens():
    s = PlanSetup(SIZES["gpt2"], seq_len=512, label_fraction=0.25)
    V, d = 50257, 768
    assert plan_compute(s).lm_head == 6 * V * d * 128
    assert plan_compute(s.with_(loss="full")).lm_head == 6 * V * d * 512


def test_doubling_the_sequence_is_not_4x():
    rows = {r["seq_len"]: r for r in seq_len_table(SIZES["gpt2-large"])}
    L, d = 36, 1280
    assert rows[1024]["attention"] == 12 * L * 1024 * d and rows[1024]["dense"] == 72 * L * d * d
    # Per sequence, 512 -> 1024 costs ~2.12x for Large (not the 4x of a pure T^2 cost); per token ~6% more.
    assert rows[1024]["per_sequence_factor"] == pytest.approx(2.12, abs=0.01)
    assert rows[1024]["per_token_factor"] == pytest.approx(1.06, abs=0.005)
    assert rows[256]["attention_share"] < rows[512]["attention_share"] < rows[1024]["attention_share"] < 0.12


def test_step_time_at_stated_mfu():
    s = PlanSetup(SIZES["gpt2-large"], seq_len=1024, micro_batch=8, accum=4, gpus=8)
    t = step_time(s, get_accelerator("h100-sxm"), mfu=0.5)
    flops = plan_compute(s).model_flops * 4
    assert t.seconds == pytest.approx(flops / (989e12 * 0.5))
    assert t.tokens_per_second == pytest.approx(8 * 1024 * 4 * 8 / t.seconds)
    # Checkpointing costs a (partial) extra forward at the same MFU.
    assert step_time(s.with_(checkpointing=True), get_accelerator("h100-sxm"), 0.5).seconds > t.seconds * 1.2


def test_accelerator_table_and_errors():
    assert {"h100-sxm", "h100-pcie", "a100", "l4", "rtx-4090"} <= set(ACCELERATORS)
    assert peak_tflops(get_accelerator("rtx-4090"), "bf16") == 165.2
    assert peak_tflops(get_accelerator("a100"), "fp32") == 19.5
    with pytest.raises(ValueError, match="no bf16"):
        peak_tflops(get_accelerator("v100"), "bf16")
    with pytest.raises(ValueError, match="unknown accelerator"):
        get_accelerator("h300")
