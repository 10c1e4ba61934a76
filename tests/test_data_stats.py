"""`qatune stats`: exact statistics on small inputs, the CLI's files, and the real data sets checked
against an independent count made with the tokenizer directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatune.cli import main
from qatune.data.encode import Encoding
from qatune.data.example import IGNORE
from qatune.data.stats import compute_stats, padding_stats, summarize

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def enc(q: int, a: int) -> Encoding:
    return Encoding(list(range(q + a)), [IGNORE] * q + list(range(a)), q, "s", "s:1")


def test_summary_percentiles_and_ratios_exact():
    assert summarize([1, 2, 3, 4, 100]) == pytest.approx(
        {
            "sum": 110,
            "mean": 22.0,
            "median": 3.0,
            "p90": 61.6,
            "p99": 96.16,
            "max": 100,
        }
    )
    stats = compute_stats([enc(10, 2), enc(30, 10), enc(5, 60)], max_len=40)
    assert stats["prompt_tokens"]["sum"] == 45 and stats["response_tokens"]["sum"] == 72
    assert stats["total_tokens"]["max"] == 65
    assert stats["response_to_prompt_ratio"] == pytest.approx(72 / 45)
    assert stats["loss_token_share"] == pytest.approx(72 / 117)
    assert stats["over_max_len"] == {"count": 1, "share": pytest.approx(1 / 3)}
    t = stats["truncation"]
    # (5, 60) is the one over 40: cut_response keeps 5 + 35; the cut_prompt policies keep 1 prompt token + 39.
    assert (t["cut_response"]["truncated"], t["cut_response"]["eos_lost"], t["cut_response"]["label_tokens_out"]) == (
        1,
        1,
        47,
    )
    assert (t["drop"]["kept"], t["drop"]["dropped"], t["drop"]["label_tokens_out"]) == (2, 1, 12)
    assert t["cut_prompt_left"]["label_tokens_out"] == 12 + 39 and t["cut_prompt_middle"]["tokens_out"] == 12 + 40 + 40
    assert (t["error"]["errors"], t["error"]["kept"]) == (1, 2)
    # padding is measured on the lengths the default policy keeps: 12, 40, 40
    assert stats["padding"]["pad_to_max_len"] == pytest.approx(1 - 92 / 120)


def test_cut_response_no_loss_counted():
    t = compute_stats([enc(50, 3), enc(3, 3)], max_len=40)["truncation"]["cut_response"]
    assert (t["kept"], t["dropped"], t["no_loss"], t["eos_lost"]) == (1, 1, 1, 0)


def test_padding_fractions_exact():
    lengths = [10, 10, 2, 2]
    pad = padding_stats(lengths, max_len=12, batch_size=2, seed=0)
    assert pad["pad_to_max_len"] == pytest.approx(1 - 24 / 48)
    assert pad["length_grouped"] == 0.0  # (10, 10) and (2, 2)
    assert pad["packing"] == pytest.approx(0.0) and pad["packing_rows"] == 2  # 10+2, 10+2
    assert pad["pad_to_longest_random"] in (pytest.approx(0.0), pytest.approx(1 - 24 / 40))


def test_packing_padding_is_what_training_computes():
    """Training packs each micro-batch of `batch_size` examples into rows of at most max_len and
    pads every row to the longest row of its micro-batch; the report measures exactly that, not an
    ideal packing of the whole set into full rows."""
    import random

    from qatune.data.example import EncodedExample
    from qatune.data.plan import BatchConfig, epoch_micro_batches, make_batch

    lengths = [random.Random(1).randint(3, 60) for _ in range(97)]
    pad = padding_stats(lengths, max_len=64, batch_size=8, seed=0)
    examples = [EncodedExample([1] * n, [1] * n) for n in lengths]
    batches = [
        make_batch([examples[i] for i in micro], "packed", 64, 0)
        for micro in epoch_micro_batches(lengths, BatchConfig(strategy="packed", size=8), seed=0)
    ]
    computed = sum(b.input_ids.numel() for b in batches)
    assert pad["packing"] == pytest.approx(1 - sum(lengths) / computed)
    assert pad["packing_rows"] == sum(b.input_ids.shape[0] for b in batches)
    assert pad["packing"] > 0.05  # per micro-batch rows are shorter and less full than max_len rows


def run_cli(*args) -> int:
    return main(["stats", *map(str, args)])


def test_cli_writes_report_json_and_plots(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "report"
    rc = run_cli(
        FIXTURES / "alpaca.json", FIXTURES / "question_answer.csv", "--tokenizer", tokenizer_dir,
        "--max-len", 48, "--template", "alpaca", "--out", out, "--json", tmp_path / "s.json",
    )  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["lengths_cdf.png", "lengths_hist.png", "stats.json", "stats.md"]
    for png in ("lengths_hist.png", "lengths_cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "s.json").read_text())
    assert data == json.loads((out / "stats.json").read_text())
    assert data["examples"] == 5 and data["template"]["name"] == "alpaca"
    assert data["over_max_len"]["count"] == 1  # the Alpaca preamble alone is ~30 tokens
    assert set(data["per_source"]) == {str(FIXTURES / "alpaca.json"), str(FIXTURES / "question_answer.csv")}
    assert data["layouts"] == {
        str(FIXTURES / "alpaca.json"): "alpaca",
        str(FIXTURES / "question_answer.csv"): "question_answer",
    }
    md = (out / "stats.md").read_text()
    assert "| cut_response |" in md and "## Per source" in md and "![CDF](lengths_cdf.png)" in md
    shown = capsys.readouterr().out
    assert "E[A] / E[Q]" in shown and "(training: packed)" in shown


def test_cli_bad_data_fails_with_one_line_and_writes_nothing(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": 5}\n')
    rc = run_cli(bad, "--tokenizer", tokenizer_dir, "--out", tmp_path / "out", "--json", tmp_path / "s.json")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"qatune stats: error: {bad}:2: field 'answer' must be a string, got int"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.json").exists()
    assert run_cli(bad, "--tokenizer", tokenizer_dir, "--skip-bad", "--json", tmp_path / "s.json") == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert (data["records"], data["skipped"]) == (1, 1)


def independent_counts(tok, data_dir: Path) -> dict:
    """Prompt and response token counts made with the tokenizer directly, field by field."""
    prompts, responses = [], []
    for f in sorted((data_dir / "t0_qa_subset").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            prompts.append(r["prompt"])
            responses.append(r["completion"].removesuffix("<|endoftext|>"))  # the real EOS is counted below
    for line in (data_dir / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        prompts.append(r["question"])
        responses.append(r["answer"])
    q = [len(ids) for ids in tok(prompts)["input_ids"]]
    a = [len(ids) + 1 for ids in tok(responses)["input_ids"]]
    total = [x + y for x, y in zip(q, a)]
    return {
        "n": len(q),
        "prompt": (sum(q), max(q)),
        "response": (sum(a), max(a)),
        "total": (sum(total), max(total)),
        "over_256": sum(t > 256 for t in total),
    }


@pytest.mark.slow
def test_real_data_sums_and_maxima_match_an_independent_count(tmp_path, data_dir, tokenizer_dir, gpt2_tokenizer):
    out = tmp_path / "s.json"
    rc = run_cli(
        data_dir / "t0_qa_subset", data_dir / "gsm8k" / "train.jsonl", "--tokenizer", tokenizer_dir,
        "--template", "raw", "--max-len", 256, "--json", out,
    )  # fmt: skip
    assert rc == 0
    got = json.loads(out.read_text())
    want = independent_counts(gpt2_tokenizer, data_dir)
    full = "fixtures" not in data_dir.parts  # the full sets, or the samples of a fresh clone
    counts = [19162, 7473] if full else [96 * 3, 200]
    assert got["examples"] == want["n"] == sum(counts)
    for key, field in (("prompt", "prompt_tokens"), ("response", "response_tokens"), ("total", "total_tokens")):
        assert (got[field]["sum"], got[field]["max"]) == want[key], key
    assert got["over_max_len"]["count"] == want["over_256"]
    assert got["truncation"]["drop"]["dropped"] == want["over_256"]
    assert got["layouts"][str(data_dir / "gsm8k" / "train.jsonl")] == "question_answer"
    assert [s["examples"] for s in got["per_source"].values()] == counts


def test_cli_one_folder_breaks_down_per_file(tmp_path, tokenizer_dir):
    folder = tmp_path / "set"
    folder.mkdir()
    for name in ("dolly.jsonl", "self_instruct.jsonl"):
        (folder / name).write_bytes((FIXTURES / name).read_bytes())
    assert run_cli(folder, "--tokenizer", tokenizer_dir, "--json", tmp_path / "s.json", "--train-on-turns", "last") == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert {k: v["examples"] for k, v in data["per_source"].items()} == {"dolly.jsonl": 2, "self_instruct.jsonl": 2}
    assert data["layouts"] == {
        str(folder / "dolly.jsonl"): "dolly",
        str(folder / "self_instruct.jsonl"): "self_instruct",
    }
