"""`qatune plan` end to end: the printed plan, JSON, errors, and --measure on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
from tests.tolerances import assert_plan_measure_holds

from qatune.cli import main


def run_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_for_gpt2_large(capsys):
    out = run_json(capsys, "--model", "gpt2-large", "--seq-len", "512", "--precision", "bf16-master")
    assert out["state"]["params"] == 774_030_080
    state = out["state"]
    assert (state["weights"], state["grads"], state["master"]) == (2 * 774_030_080, 2 * 774_030_080, 4 * 774_030_080)
    assert any("774M" in c for c in out["corrections"])
    assert out["seq_len_table"][2]["per_sequence_factor"] == pytest.approx(2.12, abs=0.01)
    assert out["advice"][0].startswith("fits in NVIDIA H100 SXM 80GB")


def test_plan_text_table_and_advice(capsys):
    argv = ["plan", "--model", "gpt2-xl", "--seq-len", "1024", "--micro-batch", "8", "--precision", "fp32"]
    assert main([*argv, "--gpu", "rtx-4090"]) == 0
    text = capsys.readouterr().out
    assert "1557.6M parameters" in text
    assert "does not fit in NVIDIA GeForce RTX 4090 24GB" in text
    assert "fits with activation checkpointing + bf16 autocast + micro-batch 1 x accum 8" in text
    assert "~6 GB is the fp32 size" in text
    for T in ("256", "512", "1024"):
        assert f"\n  {T:>6}" in text


def test_zero3_offload_plan_puts_optimizer_on_the_host(capsys):
    out = run_json(capsys, "--model", "gpt2-large", "--zero", "3", "--gpus", "4", "--offload", "optimizer")
    assert out["device_bytes"]["optimizer state"] == 0
    assert out["host_bytes"]["optimizer state"] > 6e9  # 8 bytes/param x 774M, all ranks of the host


def test_bad_settings_are_one_line_errors(capsys):
    assert main(["plan", "--seq-len", "2048"]) == 2
    assert "seq_len 2048 is outside 1..1024" in capsys.readouterr().err
    assert main(["plan", "--gpu", "tpu"]) == 2
    assert "unknown accelerator 'tpu'" in capsys.readouterr().err
    assert main(["plan", "--offload", "all", "--gpus", "2"]) == 2
    assert "offload needs a ZeRO stage" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["--lora-r", "8"]], ids=["full", "lora"])
def test_measure_a_tiny_checkpoint_folder(capsys, hf_tiny_dir, lora):
    args = ["--model", str(hf_tiny_dir), "--seq-len", "64", "--micro-batch", "2", "--precision", "fp32", *lora]
    out = run_json(capsys, *args, "--measure", "--device", "cpu")
    # the peak RSS of a fresh process, after a warm-up step (kernels' first use is not the model's)
    assert_plan_measure_holds(out)
    if lora:
        assert out["measurement"]["grads"] == 4 * 8 * 2 * (4 + 2 + 5 + 5) * 64  # the adapters only
        return
    assert out["measurement"]["params"] == 4 * (50257 * 64 + 128 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64)
