"""`qatune stats` says what text costs in tokens with this tokenizer, field by field, warns when it
costs far more than English, and names the truncation policy that keeps the most examples: in the
terminal table, the Markdown report and the JSON, run as a user types it."""

from __future__ import annotations

import json

from qatune.cli import main


def run_stats(data, tokenizer_dir, tmp_path, capsys, *extra: str) -> tuple[dict, str, str, str]:
    out_dir = tmp_path / "report"
    rc = main(["stats", str(data), "--tokenizer", str(tokenizer_dir), "--out", str(out_dir), "--json", "-", *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    table = captured.out[: captured.out.index("wrote ")]
    report = json.loads(captured.out[captured.out.index("\n{") + 1 :])
    return report, table, captured.err, (out_dir / "stats.md").read_text(encoding="utf-8")


def test_vietnamese_costs_far_more_tokens_and_a_policy_keeps_what_cut_response_drops(
    data_dir, tokenizer_dir, tmp_path, capsys
):
    """XQuAD-vi at max_len 1024: every field under 1.5 characters per token (English: ~4.5), and
    cut_response drops the records whose passage alone passes 1,024 tokens, which cut_prompt_middle keeps."""
    data = data_dir / "xquad_vi" / "train.jsonl"
    n = sum(1 for _ in data.open(encoding="utf-8"))
    report, table, err, md = run_stats(data, tokenizer_dir, tmp_path, capsys, "--max-len", "1024")
    cost = report["chars_per_token"]
    assert set(cost) == {"prompt", "context", "response"}
    assert all(c["texts"] == n and c["chars_per_token"] < 1.5 and c["far_more_than_english"] for c in cost.values())
    context = cost["context"]
    assert context["chars"] == sum(len(json.loads(line)["context"]) for line in data.open(encoding="utf-8"))
    best = report["best_truncation"]
    dropped = report["truncation"]["cut_response"]["dropped"]
    assert dropped > 0.02 * n and best == {
        "policy": "cut_prompt_middle",
        "kept": n,
        "default_kept": n - dropped,
        "examples": n,
    }
    cost_line = next(w for w in report["warnings"] if w.startswith("text costs far more tokens than English"))
    trunc_line = f"truncation cut_response at max_len 1024 drops {dropped} of {n} examples; cut_prompt_middle keeps {n}"
    assert any(w.startswith(trunc_line) for w in report["warnings"])
    for shown in (err, md):
        assert cost_line in shown and trunc_line in shown
    for shown in (table, md):
        assert "Characters per token" in shown and "far more than English" in shown
        assert f"cut_prompt_middle: {n} of {n} (default cut_response: {n - dropped})" in shown


def test_english_costs_what_english_costs_and_raises_no_warning(data_dir, tokenizer_dir, tmp_path, capsys):
    """The English reference: t0 prompts and completions at 4-5 characters per token; the literal
    `<|endoftext|>` ending every t0 completion is one token, not 13 characters of text."""
    data = data_dir / "t0_qa_subset" / "adversarial_qa_dbert_answer_the_following_q.jsonl"
    report, table, err, md = run_stats(data, tokenizer_dir, tmp_path, capsys, "--template", "raw")
    cost = report["chars_per_token"]
    assert set(cost) == {"prompt", "response"}
    assert all(4.0 < c["chars_per_token"] < 5.0 and not c["far_more_than_english"] for c in cost.values())
    assert report["warnings"] == [] and "warning" not in err and "far more than English" not in table
    n = report["examples"]
    assert f"truncation keeping the most examples │ cut_response: {n:,} of {n:,} │" in " ".join(table.split())
