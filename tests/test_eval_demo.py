"""End to end: train the demo model (its quick setting), `qatune eval` it on the demo's held-out
questions, and check the reported exact match against a direct count from the generations file."""

from __future__ import annotations

import dataclasses
import json

import pytest

from qatune.cli import main
from qatune.generation.batch import read_records
from qatune.generation.metrics import normalize_answer


@pytest.mark.slow
def test_eval_of_the_demo_model(tmp_path, tokenizer_dir, capsys):
    from qatune.demo.run import QUICK, DemoSettings, run_demo
    from qatune.demo.task import make_task

    # The quick setting, at half its steps: enough for a large gain (~70% measured), within our test budget.
    quick = {**QUICK, "steps": QUICK["steps"] // 2}
    settings = dataclasses.replace(DemoSettings(out_dir=str(tmp_path), tokenizer=str(tokenizer_dir)), **quick)
    demo = run_demo(settings, log=lambda *_: None)
    _, held_out = make_task(settings.seed)
    run = demo.train.run_dir
    data = run / "held_out.jsonl"  # the demo writes its held-out questions for exactly this
    assert [json.loads(line) for line in data.read_text().splitlines()] == [
        {"question": q.question, "answer": q.answer} for q in held_out
    ]

    assert main(["eval", str(run), str(data), "--max-new-tokens", "8", "--batch-size", "32"]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    records = read_records(run / "eval" / "generations.jsonl")
    assert len(records) == len(held_out) == report["generation"]["n"]

    # The reported exact match is a direct count from the generations file ...
    direct = sum(normalize_answer(r["generation"]) == normalize_answer(r["reference"]) for r in records)
    assert report["generation"]["exact_match"] == pytest.approx(direct / len(records))
    # ... and the same generations the demo scored itself (its strict comparison, same greedy decoding).
    strict = sum(r["generation"].strip() == r["reference"] for r in records)
    assert strict == round(demo.accuracy_after * len(held_out))
    assert direct >= strict
    # The tuned model answers and stops: a large gain over the untrained one (~0%).
    assert report["generation"]["exact_match"] > demo.accuracy_before + 0.3
    assert report["generation"]["stopped_at_eos"] == 1.0
    assert report["template"] == "plain" and report["max_len"] == 64  # read from the run's qatune.json
    assert report["loss"]["examples"] == len(held_out) and report["loss"]["perplexity"] < 3.0
    assert "| exact match |" in (run / "eval" / "report.md").read_text()
