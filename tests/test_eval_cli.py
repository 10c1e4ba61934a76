"""`qatune eval` on a tiny exported model: the reported loss equals a plain transformers computation,
the reported metrics equal a direct count from the generations file, --compare and warnings."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qatune.cli import main
from qatune.data.encode import tokenize_with_eos
from qatune.data.templates import get_template
from qatune.generation.batch import read_records
from qatune.generation.metrics import normalize_answer
from qatune.generation.sampling import SamplingConfig, generate_ids
from qatune.model.hf_io import from_pretrained

QUESTIONS = ["What is two plus two?", "Name a colour.", "Thủ đô của Việt Nam là gì?", "Why is the sky blue?", "Say hi."]
MAX_NEW = 6


@pytest.fixture(scope="module")
def run_dir(make_tiny_run):
    return make_tiny_run("plain")


def greedy_answers(model_dir, tokenizer):
    model = from_pretrained(model_dir)
    prompts = tokenize_with_eos([get_template("plain").render_prompt(q) for q in QUESTIONS], tokenizer)
    gens = generate_ids(model, prompts, tokenizer.eos_token_id, SamplingConfig(max_new_tokens=MAX_NEW))
    return [tokenizer.decode(g.ids) for g in gens]


@pytest.fixture(scope="module")
def data_file(run_dir, gpt2_tokenizer, tmp_path_factory):
    """Even records' reference is the model's own greedy answer (an exact match), odd ones not."""
    answers = greedy_answers(run_dir / "export", gpt2_tokenizer)
    assert all(normalize_answer(a) for a in answers)  # the random model says something non-empty
    path = tmp_path_factory.mktemp("data") / "held_out.jsonl"
    rows = [
        {"question": q, "answer": a if i % 2 == 0 else "a wrong answer"}
        for i, (q, a) in enumerate(zip(QUESTIONS, answers))
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def plain_response_loss(model_dir, tokenizer, rows) -> float:
    """Mean CE over answer tokens + EOS with transformers' own model and full logits."""
    from transformers import GPT2LMHeadModel

    ref = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for r in rows:
        prompt = tokenizer(get_template("plain").render_prompt(r["question"])).input_ids
        answer = get_template("plain").render_response(r["answer"])  # " Paris": the answer's own space
        answer = tokenizer(answer).input_ids + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = ref(ids).logits[0]
        # position i predicts token i+1: the answer tokens are predicted from len(prompt)-1 on
        pred = logits[len(prompt) - 1 : -1]
        total += float(F.cross_entropy(pred, torch.tensor(answer), reduction="sum"))
        count += len(answer)
    return total / count


def test_eval_report_matches_direct_counts(run_dir, data_file, gpt2_tokenizer, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(run_dir), str(data_file), "--out", str(out), "--max-new-tokens", str(MAX_NEW)]
    assert main([*args, "--batch-size", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    records = read_records(out / "generations.jsonl")
    assert len(records) == len(QUESTIONS)

    # exact match: a direct count from the generations file, and the 3 even records we planted
    direct_em = sum(normalize_answer(r["generation"]) == normalize_answer(r["reference"]) for r in records)
    assert direct_em == 3
    assert report["generation"]["exact_match"] == pytest.approx(direct_em / len(records))
    assert report["generation"]["by_source"][str(data_file)]["n"] == 5
    assert report["generation"]["no_eos"] == sum(not r["stopped_at_eos"] for r in records)

    rows = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines()]
    expected = plain_response_loss(run_dir / "export", gpt2_tokenizer, rows)
    assert report["loss"]["response_loss"] == pytest.approx(expected, rel=1e-5)
    assert report["loss"]["perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert report["template"] == "plain" and report["max_len"] == 128  # taken from qatune.json

    md = (out / "report.md").read_text()
    assert f"| exact match | {direct_em / 5:.1%} |" in md
    assert "Thủ đô của Việt Nam là gì?" in md  # an example generation, Unicode intact
    # The random model never emits EOS: that is reported, not hidden.
    err = capsys.readouterr().err
    if report["generation"]["no_eos"] == 5:
        assert "never emitted EOS" in err and "never emitted EOS" in md

    # Running again resumes: nothing to generate, the same numbers.
    assert main([*args, "--batch-size", "3"]) == 0
    assert json.loads((out / "report.json").read_text())["generation"] == report["generation"]


def test_compare_with_base_model(run_dir, data_file, hf_tiny_dir, tmp_path):
    out = tmp_path / "cmp"
    args = ["eval", str(run_dir), str(data_file), "--out", str(out), "--max-new-tokens", str(MAX_NEW), "--limit", "2"]
    assert main([*args, "--compare", str(hf_tiny_dir)]) == 0
    report = json.loads((out / "report.json").read_text())
    base = report["base"]
    # Same weights, same prompts: the base side must equal the tuned side exactly.
    assert base["generation"]["exact_match"] == report["generation"]["exact_match"] == 0.5
    assert base["loss"]["response_loss"] == pytest.approx(report["loss"]["response_loss"])
    assert (
        read_records(out / "base.generations.jsonl")[0]["generation"]
        == read_records(out / "generations.jsonl")[0]["generation"]
    )
    md = (out / "report.md").read_text()
    assert "| metric | model | base | model − base |" in md and "| exact match | 50.0% | 50.0% | +0.0 pt |" in md


def test_bad_data_is_a_one_line_error(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"\n', encoding="utf-8")
    assert main(["eval", str(run_dir), str(bad), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qatune eval: error:") and "bad.jsonl:2" in err
    assert not (tmp_path / "e" / "report.json").exists()
    assert main(["eval", str(run_dir), str(bad), "--max-len", "500"]) == 2
    assert "max_len 500 exceeds the model's context of 128 tokens" in capsys.readouterr().err


def test_truncation_policy_comes_from_the_runs_config(tmp_path):
    from qatune.cli.eval import training_truncation

    (tmp_path / "export").mkdir()
    assert training_truncation(str(tmp_path / "export")) is None
    (tmp_path / "config.yaml").write_text("name: r\ndata:\n  truncation: drop\n  max_len: 64\n")
    assert training_truncation(str(tmp_path / "export")) == "drop"
    assert training_truncation(str(tmp_path)) is None  # not an export folder: no run config to read


def test_real_data_two_sources_long_prompts(run_dir, data_dir, gpt2_tokenizer, tmp_path):
    """t0 (passages longer than the tiny model's 128-token context) and GSM8K in one eval."""
    t0 = tmp_path / "duorc.jsonl"
    lines = (data_dir / "t0_qa_subset" / "duorc_ParaphraseRC_answer_question.jsonl").read_text().splitlines()[:3]
    t0.write_text("\n".join(lines) + "\n")
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("\n".join((data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:2]) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", str(run_dir), str(t0), str(gsm), "--out", str(out), "--max-new-tokens", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    gen = report["generation"]
    assert sorted(gen["by_source"]) == sorted([str(t0), str(gsm)])
    assert gen["by_source"][str(t0)]["n"] == 3 and gen["by_source"][str(gsm)]["n"] == 2
    # prompts cut: exactly those longer than the context minus the reply room, counted directly
    template = get_template("plain")
    rows = [json.loads(line) for line in lines]
    long = sum(len(gpt2_tokenizer(template.render_prompt(r["prompt"])).input_ids) > 128 - 4 for r in rows)
    assert long == 3 and gen["prompts_cut"] == long
    assert any("cut from the left" in w for w in report["warnings"])
    # t0 completions end with the literal <|endoftext|>: never part of the reference
    records = read_records(out / "generations.jsonl")
    assert all("<|endoftext|>" not in r["reference"] for r in records)
    assert [r["reference"] for r in records[:3]] == [r["completion"].replace("<|endoftext|>", "") for r in rows]
