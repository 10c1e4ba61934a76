"""`qatune stats --compare-tokenizer qwen2.5`, run as a user types it: GPT-2's vocabulary and
Qwen2.5's side by side on the same records. On Vietnamese (XQuAD-vi) Qwen2.5's spends well under
half the tokens and puts no example over 1,024 where GPT-2 puts one in six; on English (t0) the two
are within 10% (GPT-2 slightly cheaper)."""

from __future__ import annotations

import json

import pytest
from tests.qwen_vocab import qwen_cache  # noqa: F401  (fixture)

from qatune.cli import main


def side_by_side(data, tokenizer_dir, tmp_path, capsys, *extra: str) -> tuple[dict, str, str]:
    out_dir = tmp_path / "report"
    args = ["stats", str(data), "--tokenizer", str(tokenizer_dir), "--compare-tokenizer", "qwen2.5"]
    rc = main([*args, "--out", str(out_dir), "--json", "-", *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    table = " ".join(captured.out[: captured.out.index("wrote ")].split())
    report = json.loads(captured.out[captured.out.index("\n{") + 1 :])
    return report, table, (out_dir / "stats.md").read_text(encoding="utf-8")


def test_vietnamese_takes_far_fewer_tokens_with_qwens_vocabulary(
    data_dir,
    tokenizer_dir,
    tmp_path,
    capsys,
    qwen_cache,  # noqa: F811  (the fixture)
    monkeypatch,
):
    monkeypatch.setenv("QATUNE_CACHE", str(qwen_cache))
    data = data_dir / "xquad_vi" / "train.jsonl"
    n = sum(1 for _ in data.open(encoding="utf-8"))
    report, table, md = side_by_side(data, tokenizer_dir, tmp_path, capsys, "--max-len", "1024")
    gpt2, qwen = report["tokenizers"]
    assert (gpt2["name"], qwen["name"], qwen["tokenizer"]) == ("gpt2", "qwen2.5", "qwen2.5")
    assert (gpt2["vocab_size"], qwen["vocab_size"]) == (50_257, 151_665)
    # The first column is the report's own tokenizer: the same numbers as the rest of the report.
    assert gpt2["chars_per_token"] == {f: c["chars_per_token"] for f, c in report["chars_per_token"].items()}
    assert gpt2["over_max_len"] == report["over_max_len"] and gpt2["tokens_per_example"] == report["total_tokens"]
    assert set(qwen["chars_per_token"]) == {"prompt", "context", "response"}
    assert qwen["fields"]["chars"] == gpt2["fields"]["chars"]  # the same text, counted once
    assert gpt2["fields"]["chars_per_token"] < 1.5 and qwen["fields"]["chars_per_token"] > 3.0
    fewer = qwen["fewer_tokens_than_first"]
    assert fewer["fields"] == pytest.approx(gpt2["fields"]["tokens"] / qwen["fields"]["tokens"])
    assert fewer["fields"] > 2.5 and fewer["examples"] > 2.5
    assert gpt2["fewer_tokens_than_first"] == {"fields": 1.0, "examples": 1.0}
    # One example in six (GPT-2) against none (Qwen2.5) over 1,024 tokens.
    assert gpt2["over_max_len"]["share"] > 0.1 and qwen["over_max_len"] == {"count": 0, "share": 0.0}
    assert qwen["tokens_per_example"]["max"] <= 1024 < gpt2["tokens_per_example"]["max"]
    over = gpt2["over_max_len"]["count"]
    row = f"examples over max_len 1024 │ {over} ({100 * over / n:.1f}%) │ 0 (0.0%) │"
    ratio_row = f"fewer tokens than gpt2, field text │ 1.00x │ {fewer['fields']:.2f}x │"
    assert "Tokenizers side by side" in table and row in table and ratio_row in table
    assert "## Tokenizers side by side" in md and "|  | gpt2 | qwen2.5 |" in md
    assert f"| examples over max_len 1024 | {over} ({100 * over / n:.1f}%) | 0 (0.0%) |" in md


def test_english_costs_about_the_same_with_either_vocabulary(
    data_dir,
    tokenizer_dir,
    tmp_path,
    capsys,
    qwen_cache,  # noqa: F811  (the fixture)
    monkeypatch,
):
    monkeypatch.setenv("QATUNE_CACHE", str(qwen_cache))
    data = data_dir / "t0_qa_subset" / "adversarial_qa_dbert_answer_the_following_q.jsonl"
    report, _, _ = side_by_side(data, tokenizer_dir, tmp_path, capsys, "--template", "raw")
    gpt2, qwen = report["tokenizers"]
    assert 0.9 < qwen["fewer_tokens_than_first"]["fields"] < 1.0
    assert 4.0 < qwen["fields"]["chars_per_token"] < gpt2["fields"]["chars_per_token"] < 5.0


def test_preference_data_is_refused_in_one_line(data_dir, tokenizer_dir, capsys):
    data = data_dir / "hh_rlhf_harmless" / "test.jsonl"
    rc = main(["stats", str(data), "--tokenizer", str(tokenizer_dir), "--compare-tokenizer", "qwen2.5"])
    err = capsys.readouterr().err
    assert rc == 2 and err == (
        "qatune stats: error: --compare-tokenizer measures instruction data; preference pairs are not compared\n"
    )
