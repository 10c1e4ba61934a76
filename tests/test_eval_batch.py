"""Batch generation to a JSONL file: per-record content and metrics, resume, torn lines, mismatches."""

from __future__ import annotations

import json

import pytest

import qatune.generation.batch as batch_mod
from qatune.generation.batch import PromptItem, generate_to_file, meta_path, read_records
from qatune.generation.metrics import exact_match, rouge_l, token_f1
from qatune.generation.sampling import SamplingConfig, generate_ids

CFG = SamplingConfig(max_new_tokens=6)


def items(n=7):
    words = ["alpha", "beta gamma", "delta epsilon zeta eta", "Hà Nội", "one two three four five six", "x", "why?"]
    return [
        PromptItem(f"f.jsonl:{i + 1}", "f.jsonl" if i % 2 else "g.jsonl", w, f"Q: {w}\nA:", f"ref {w}")
        for i, w in enumerate(words[:n])
    ]


def test_records_hold_generation_and_metrics(tiny_model, gpt2_tokenizer, tmp_path):
    out = tmp_path / "gen.jsonl"
    records = generate_to_file(tiny_model, gpt2_tokenizer, items(), out, CFG, batch_size=3, settings={"model": "m"})
    assert [r["index"] for r in records] == list(range(7))
    assert read_records(out) == records
    for item, r in zip(items(), records):
        # Each prompt generates what it generates alone (batching and left padding change nothing).
        alone = generate_ids(tiny_model, [gpt2_tokenizer(item.text).input_ids], gpt2_tokenizer.eos_token_id, CFG)[0]
        assert r["generation"] == gpt2_tokenizer.decode(alone.ids)
        assert r["generated_tokens"] == len(alone.ids) and r["stopped_at_eos"] == alone.stopped_at_eos
        assert (r["prompt"], r["reference"], r["source"], r["where"]) == (
            item.prompt,
            item.reference,
            item.source,
            item.where,
        )
        assert r["exact_match"] == exact_match(r["generation"], item.reference)
        assert r["f1"] == token_f1(r["generation"], item.reference)
        assert r["rouge_l"] == rouge_l(r["generation"], item.reference)
        assert r["reference_tokens"] == len(gpt2_tokenizer(item.reference).input_ids)
    assert json.loads(meta_path(out).read_text())["sampling"]["max_new_tokens"] == 6


def test_resume_skips_written_records_and_redoes_a_torn_line(tiny_model, gpt2_tokenizer, tmp_path, monkeypatch):
    full = generate_to_file(tiny_model, gpt2_tokenizer, items(), tmp_path / "full.jsonl", CFG, batch_size=2)
    out = tmp_path / "gen.jsonl"
    generate_to_file(tiny_model, gpt2_tokenizer, items(), out, CFG, batch_size=2)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = lines[:3]
    torn = lines[3][: len(lines[3]) // 2]  # a write cut short: no newline
    out.write_text("".join(kept) + torn, encoding="utf-8")

    seen = []
    real = batch_mod.generate_ids
    monkeypatch.setattr(batch_mod, "generate_ids", lambda m, p, e, c: seen.extend(p) or real(m, p, e, c))
    resumed = generate_to_file(tiny_model, gpt2_tokenizer, items(), out, CFG, batch_size=2)
    assert len(seen) == 4  # 7 records, 3 complete lines kept: the torn one and 3 others redone
    assert resumed == full
    assert read_records(out) == full
    assert len(out.read_text(encoding="utf-8").splitlines()) == 7

    seen.clear()
    assert generate_to_file(tiny_model, gpt2_tokenizer, items(), out, CFG, batch_size=2) == full
    assert seen == []  # nothing left to do


def test_resume_refuses_other_settings_or_other_data(tiny_model, gpt2_tokenizer, tmp_path):
    out = tmp_path / "gen.jsonl"
    generate_to_file(tiny_model, gpt2_tokenizer, items(3), out, CFG, settings={"model": "a"})
    with pytest.raises(ValueError, match="max_new_tokens|sampling"):
        shorter = SamplingConfig(max_new_tokens=5)
        generate_to_file(tiny_model, gpt2_tokenizer, items(3), out, shorter, settings={"model": "a"})
    with pytest.raises(ValueError, match="model"):
        generate_to_file(tiny_model, gpt2_tokenizer, items(3), out, CFG, settings={"model": "b"})
    other = [PromptItem(i.where, i.source, i.prompt + "!", i.text, i.reference) for i in items(3)]
    with pytest.raises(ValueError, match=r"gen\.jsonl:1: record 0 does not match"):
        generate_to_file(tiny_model, gpt2_tokenizer, other, out, CFG, settings={"model": "a"})


def test_long_prompt_is_cut_from_the_left_to_leave_room(tiny_model, gpt2_tokenizer, tmp_path):
    long_text = " ".join(["word"] * 200) + "\nA:"
    item = PromptItem("x:1", "x", "long", long_text, "r")
    [r] = generate_to_file(tiny_model, gpt2_tokenizer, [item], tmp_path / "g.jsonl", CFG)
    assert r["prompt_cut"] is True and r["generated_tokens"] == 6  # full room despite the long prompt
    kept = gpt2_tokenizer(long_text).input_ids[-(128 - 6) :]
    alone = generate_ids(tiny_model, [kept], gpt2_tokenizer.eos_token_id, CFG)[0]
    assert r["generation"] == gpt2_tokenizer.decode(alone.ids)


def test_prompt_items_for_pairs_and_conversations():
    from qatune.data.records import Message, Record
    from qatune.data.templates import get_template
    from qatune.generation.evaluate import prompt_item

    tpl = get_template("chat", "Be brief.")
    # t0-style completion: the literal EOS text at its end is not part of the reference
    pair = Record("t0.jsonl", "t0.jsonl:3", prompt="Capital of France?", response=" Paris<|endoftext|>", context="Geo.")
    item = prompt_item(pair, tpl)
    assert (item.where, item.prompt, item.reference) == ("t0.jsonl:3", "Capital of France?", " Paris")
    assert item.text == tpl.render_prompt("Capital of France?", "Geo.")

    turns = [("user", "hi"), ("assistant", "hello"), ("user", "2+2?"), ("assistant", "4"), ("user", "bye")]
    chat = Record("c.jsonl", "c.jsonl:1", messages=[Message(r, c) for r, c in turns])
    item = prompt_item(chat, tpl)
    # answered at its last assistant turn, with the history before it; later turns are not shown
    assert (item.prompt, item.reference) == ("2+2?", "4")
    assert item.text == tpl.generation_prompt([Message(r, c) for r, c in turns[:3]])
    assert item.text.startswith("### System:\nBe brief.") and "bye" not in item.text


@pytest.mark.slow
def test_generate_killed_mid_run_resumes_to_the_same_file(hf_tiny_dir, gpt2_tokenizer, tokenizer_dir, tmp_path):
    """SIGKILL a real `qatune generate --out` after its first batches; the rerun completes the file."""
    import os
    import signal
    import subprocess
    import sys
    import time

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Story {i}: once"}) + "\n" for i in range(32)))
    out = tmp_path / "g.jsonl"
    args = [str(hf_tiny_dir), "--file", str(prompts), "--out", str(out), "--batch-size", "2"]
    args += ["--max-new-tokens", "16", "--tokenizer", str(tokenizer_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qatune", "generate", *args], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 4 <= written < 32  # killed mid-run

    from qatune.cli import main

    # Resume (with bigger batches: a record's output does not depend on its batch) ...
    bigger = [a if a != "2" else "16" for a in args]
    assert main(["generate", *bigger]) == 0
    resumed = read_records(out)
    assert [r["index"] for r in resumed] == list(range(32))
    # ... to exactly the records of an uninterrupted run.
    assert main(["generate", *[a if a != str(out) else str(tmp_path / "full.jsonl") for a in bigger]]) == 0
    assert resumed == read_records(tmp_path / "full.jsonl")


def test_a_system_prompt_keeps_every_accepted_answer():
    """A SQuAD-style row with a `system` field becomes a conversation; its answers are still all
    references (exact match against any of them), not only the first."""
    from qatune.data.layouts import to_records
    from qatune.data.templates import get_template
    from qatune.generation.evaluate import prompt_item

    row = {"question": "Who?", "context": "Ann met Bo.", "answers": ["Ann", "ann", "Ann."], "system": "Be brief."}
    (record,) = to_records(row, "squad", None, "q.jsonl", "q.jsonl:1")
    assert record.is_conversation
    item = prompt_item(record, get_template("chat"))
    assert item.reference == "Ann" and item.references == ["Ann", "ann", "Ann."]
    assert "Be brief." in item.text and "Ann met Bo." in item.text
