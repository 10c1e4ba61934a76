"""`qatune generate`: the run's template, prompts from data files, JSONL records, resume, errors."""

from __future__ import annotations

import pytest

from qatune.cli import main
from qatune.data.templates import get_template
from qatune.generation.batch import read_records
from qatune.generation.metrics import exact_match
from qatune.generation.sampling import SamplingConfig, generate_ids
from qatune.model.hf_io import from_pretrained


@pytest.fixture(scope="module")
def run_dir(make_tiny_run):
    return make_tiny_run("alpaca")


def greedy(run_dir, tokenizer, text, n=4):
    model = from_pretrained(run_dir / "export")
    [g] = generate_ids(model, [tokenizer(text).input_ids], tokenizer.eos_token_id, SamplingConfig(max_new_tokens=n))
    return tokenizer.decode(g.ids), g.stopped_at_eos


def test_prompt_goes_through_the_runs_template(run_dir, gpt2_tokenizer, capsys):
    assert main(["generate", str(run_dir), "--prompt", "Name a colour.", "--max-new-tokens", "4"]) == 0
    text = get_template("alpaca").render_prompt("Name a colour.")
    completion, stopped = greedy(run_dir, gpt2_tokenizer, text)
    expected = text + completion + ("" if stopped else "\n[no EOS within 4 tokens]") + "\n"
    assert capsys.readouterr().out == expected


def test_raw_template_is_the_prompt_as_is(run_dir, gpt2_tokenizer, capsys):
    assert main(["generate", str(run_dir), "--prompt", "Once upon", "--template", "raw", "--max-new-tokens", "4"]) == 0
    completion, _ = greedy(run_dir, gpt2_tokenizer, "Once upon")
    assert capsys.readouterr().out.startswith("Once upon" + completion)


def test_records_from_a_data_file_with_references(run_dir, tmp_path, capsys):
    data = tmp_path / "qa.csv"
    data.write_text("question,answer\nWhat is red?,a colour\nWho are you?,a model\nWhy?,because\n", encoding="utf-8")
    out = tmp_path / "gen.jsonl"
    args = ["generate", str(run_dir), "--file", str(data), "--out", str(out), "--max-new-tokens", "3", "--limit", "2"]
    assert main(args) == 0
    records = read_records(out)
    assert [(r["where"], r["prompt"], r["reference"]) for r in records] == [
        (f"{data}:2", "What is red?", "a colour"),
        (f"{data}:3", "Who are you?", "a model"),
    ]
    assert all(r["exact_match"] == exact_match(r["generation"], r["reference"]) for r in records)
    assert "2 records with a reference" in capsys.readouterr().out
    before = out.read_text(encoding="utf-8")
    assert main(args) == 0  # resumed: nothing left to do, the file is unchanged
    assert out.read_text(encoding="utf-8") == before


def test_prompt_only_jsonl_and_its_errors(run_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n\n{"prompt": "bye"}\n', encoding="utf-8")
    out = tmp_path / "g.jsonl"
    assert main(["generate", str(run_dir), "--file", str(prompts), "--out", str(out), "--max-new-tokens", "2"]) == 0
    records = read_records(out)
    assert [(r["prompt"], r["reference"]) for r in records] == [("hello", None), ("bye", None)]
    assert "exact_match" not in records[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n', encoding="utf-8")
    assert main(["generate", str(run_dir), "--file", str(bad)]) == 2
    assert f"{bad}:2: field 'prompt'" in capsys.readouterr().err
