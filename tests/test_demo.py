"""`qatune demo` (shortened): offline, held-out exact match goes from ~0 to >= 80%."""

from __future__ import annotations

import json

import pytest

from qatune.cli import main
from qatune.demo.run import DemoSettings, run_demo
from qatune.demo.task import FACTS, PHRASINGS, make_task
from qatune.demo.tokenizer import train_bpe


def test_task_holds_out_one_phrasing_of_every_fact():
    train, test = make_task(seed=0)
    n_facts = len(FACTS) * len(PHRASINGS)
    assert len(test) == n_facts and len(train) == n_facts * 3
    assert not {q.question for q in train} & {q.question for q in test}
    # every held-out answer is taught by training questions about the same fact
    assert {q.answer for q in test} <= {q.answer for q in train}
    assert make_task(seed=0) == (train, test) and make_task(seed=1) != (train, test)


def test_builtin_tokenizer_has_eos_and_round_trips():
    tok = train_bpe(["Question: What is the capital of Peru?\nAnswer: Lima"] * 20, vocab_size=300)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id is not None
    text = "What is the capital of Zanzibar? é"  # unseen words and non-ASCII still encode (byte level)
    assert tok.decode(tok(text).input_ids) == text


@pytest.mark.slow
def test_demo_cli_offline_with_builtin_tokenizer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QATUNE_TOKENIZER", raising=False)
    assert main(["demo", "--quick", "--tokenizer", "builtin", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    before = float(out.split("exact match before training: ")[1].split("%")[0])
    after = float(out.split("exact match after 200 steps: ")[1].split("%")[0])
    assert before <= 5.0 and after >= 80.0, out
    assert "byte-level BPE trained on the demo's own text" in out
    run = tmp_path / "demo-quick"
    assert {"loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"} <= {p.name for p in (run / "plots").iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 201))
    held_out = [r["eval_loss"] for r in records if "eval_loss" in r]  # loss on the held-out questions
    assert len(held_out) == 4 and held_out[-1] < held_out[0] / 10
    meta = json.loads((run / "export" / "qatune.json").read_text())
    assert meta["template"]["name"] == "plain" and meta["max_len"] == 64
    assert (run / "export" / "tokenizer.json").exists()


@pytest.mark.slow
def test_demo_with_gpt2_tokenizer(tmp_path, tokenizer_dir):
    result = run_demo(DemoSettings(out_dir=str(tmp_path), steps=200, tokenizer=str(tokenizer_dir)), log=lambda *_: None)
    assert result.tokenizer_source == str(tokenizer_dir)
    assert result.accuracy_before <= 0.05
    assert result.accuracy_after >= 0.8
    assert all(len(s) == 3 for s in result.samples) and len(result.samples) == 5
