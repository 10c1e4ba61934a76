"""`qatune eval` picks max_new_tokens as `generate` does: 128, or half the context when that is
smaller, so `qatune eval runs/demo runs/demo/held_out.jsonl` (the demo's 64-token model) runs."""

from __future__ import annotations

import argparse
import json

from qatune.cli import main


def test_eval_default_leaves_the_prompt_half_the_context(make_tiny_run, tmp_path):
    run = make_tiny_run("plain")  # a 128-token context: a fixed 128 new tokens would leave no prompt room
    data = tmp_path / "held_out.jsonl"
    data.write_text(json.dumps({"question": "Which continent is Peru in?", "answer": "South America"}) + "\n")
    assert main(["eval", str(run), str(data), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["generation"]["max_new_tokens"] == 64 == report["sampling"]["max_new_tokens"]


def test_explicit_value_is_kept_and_compare_fits_the_smaller_context(tmp_path):
    from qatune.cli.eval import fit_to_contexts

    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({"n_positions": 40}))
    args = argparse.Namespace(max_new_tokens=None, compare=None)
    fit_to_contexts(args, 1024)
    assert args.max_new_tokens == 128
    args = argparse.Namespace(max_new_tokens=None, compare=str(small))
    fit_to_contexts(args, 1024)
    assert args.max_new_tokens == 20
    args = argparse.Namespace(max_new_tokens=7, compare=str(small))
    fit_to_contexts(args, 1024)
    assert args.max_new_tokens == 7
