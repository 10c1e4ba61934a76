"""`qatune grads` end to end on a transformers-written tiny model and real data."""

from __future__ import annotations

import json

import pytest

from qatune.cli import main


@pytest.mark.slow
def test_grads_command_writes_consistent_json_and_plots(hf_tiny_dir, tokenizer_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "grads"
    rc = main(
        [
            "grads",
            str(hf_tiny_dir),
            str(data_dir / "gsm8k" / "test.jsonl"),
            "--n",
            "10",
            "--segments-n",
            "3",
            "--bins",
            "3",
            "--max-len",
            "128",
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads((out / "grads.json").read_text())
    pe = result["per_example"]
    assert pe["n_examples"] == 10 and len(pe["sum"]["sq_norm"]) == 10
    # the mean-normalized gradient is the summed one divided by the example's label-token count
    for s, m, n in zip(pe["sum"]["sq_norm"], pe["mean"]["sq_norm"], pe["response_len"]):
        assert m == pytest.approx(s / n**2)
    assert sum(b["n"] for b in pe["sum"]["variance_by_length_bin"]) == 10
    seg = result["segments"]
    assert seg["instruction_tokens"] > 0 and seg["response_tokens"] > 0 and -1 <= seg["cosine"] <= 1
    assert [r["layer"] for r in result["layers"]] == ["embeddings", "h.0", "h.1", "ln_f"]
    assert (out / "grad_norm_vs_length.png").stat().st_size > 10_000 and (out / "per_layer.png").exists()
    assert "noise scale" in capsys.readouterr().out
