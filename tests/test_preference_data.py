"""Preference data: the three layouts and a mapping, the HH-RLHF split on real lines, tokenization
(prompt and responses apart, one EOS each), pair truncation, identical pairs, errors, and stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatune.cli import main
from qatune.data.pipeline import DataConfig
from qatune.data.preference.encode import EncodedPair, encode_pairs
from qatune.data.preference.pipeline import load_pairs
from qatune.data.preference.records import read_pairs
from qatune.data.preference.stats import length_bias
from qatune.data.preference.truncation import PairTruncationCounts, apply_pair, plan_pair
from qatune.data.records import DataError, Message
from qatune.data.templates import get_template


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_explicit_pairs_tokenize_prompt_and_responses_apart_with_one_eos(tmp_path, gpt2_tokenizer):
    tok = gpt2_tokenizer
    src = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "Capital of France?", "chosen": "Paris<|endoftext|>", "rejected": "Rome", "id": 7}],
    )
    result = load_pairs(DataConfig(sources=[src], template="plain"), tok)
    assert result.layouts == {src: "explicit"}
    (pair,) = result.pairs
    assert pair.prompt_ids == ids(tok, "Question: Capital of France?\nAnswer:")
    # plain: the answer carries its own leading space (" Paris"), as in SFT; the literal EOS is not doubled
    assert pair.chosen_ids == ids(tok, " Paris") + [tok.eos_token_id]
    assert pair.rejected_ids == ids(tok, " Rome") + [tok.eos_token_id]
    assert pair.where == f"{src}:1"
    chosen_seq, rejected_seq = pair.sequences()
    assert chosen_seq.input_ids == pair.prompt_ids + pair.chosen_ids
    assert chosen_seq.n_label_tokens == len(pair.chosen_ids)


def test_conversational_trl_format_renders_with_the_run_template(tmp_path, gpt2_tokenizer):
    row = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a color."},
        ],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "I cannot."}],
        "margin": 2,
    }
    src = write_jsonl(tmp_path / "c.jsonl", [row])
    (record,) = read_pairs(src)
    assert record.messages[0] == Message("system", "Be brief.") and record.margin == 2.0
    chat = get_template("chat")
    assert record.prompt_text(chat) == chat.generation_prompt(record.messages)
    assert record.prompt_text(chat).endswith("### User:\nName a color.\n\n### Assistant:\n")
    (pair,) = load_pairs(DataConfig(sources=[src], template="chat"), gpt2_tokenizer).pairs
    assert pair.margin == 2.0 and pair.chosen_ids == ids(gpt2_tokenizer, "Blue.") + [gpt2_tokenizer.eos_token_id]


def test_implicit_split_on_real_hh_rlhf_lines(data_dir):
    path = str(data_dir / "hh_rlhf_harmless" / "test.jsonl")
    raw = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()[:3]]
    result = read_pairs(path, limit=3)
    assert set(result.layouts.values()) == {"implicit"}
    for row, record in zip(raw, result):
        cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        assert record.chosen == row["chosen"][cut:].strip()
        assert record.rejected == row["rejected"][row["rejected"].rfind("\n\nAssistant:") + 12 :].strip()
        # The prompt is the shared dialogue as messages; the hh template writes it back in its own format.
        assert record.messages[-1].role == "user"
        rendered = record.prompt_text(get_template("hh")).replace("<|endoftext|>", "")
        assert " ".join(rendered.split()) == " ".join(row["chosen"][:cut].split())
    first = result.pairs[0]
    assert [m.role for m in first.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert first.messages[0].content == "what are some pranks with a pen i can do?"
    assert first.chosen.startswith("No, sorry!")


def test_real_hh_rlhf_bad_lines_name_line_and_field(data_dir):
    path = str(data_dir / "hh_rlhf_harmless" / "test.jsonl")
    with pytest.raises(DataError, match=r"test\.jsonl:87: field 'chosen' has an empty response"):
        read_pairs(path)
    result = read_pairs(path, skip_bad=True)
    full = "fixtures" not in Path(path).parts  # the full set, or the first 100 lines of a fresh clone
    assert (len(result) + result.skipped, result.skipped) == ((2312, 9) if full else (100, 1))
    with_prefix = [r for r in result.skip_reasons if "differ before their last assistant turn" in r]
    assert all(":" in r.split(" ")[0] for r in with_prefix)
    assert with_prefix or not full  # the first such line is 1255: in the full set only


def test_implicit_conversational_and_mapping(tmp_path):
    conv = [{"role": "user", "content": "2+2?"}]
    src = write_jsonl(
        tmp_path / "ic.jsonl",
        [
            {
                "chosen": [*conv, {"role": "assistant", "content": "4"}],
                "rejected": [*conv, {"role": "assistant", "content": "5"}],
            }
        ],
    )
    (record,) = read_pairs(src)
    assert record.messages == [Message("user", "2+2?")] and (record.chosen, record.rejected) == ("4", "5")

    src = write_jsonl(tmp_path / "m.jsonl", [{"q": "2+2?", "good": "4", "bad": "5", "w": 0.5}])
    mapping = {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": "w"}
    result = read_pairs(src, mapping=mapping)
    assert result.layouts == {src: "mapping"}
    assert (result.pairs[0].prompt, result.pairs[0].chosen, result.pairs[0].margin) == ("2+2?", "4", 0.5)
    bad = write_jsonl(tmp_path / "mb.jsonl", [{"q": "2+2?", "good": "4"}])
    with pytest.raises(DataError, match=r"mb\.jsonl:1: field 'bad' is missing"):
        read_pairs(bad, mapping=mapping)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Q", "chosen": "A"}, r"x\.jsonl:2: field 'rejected' is missing"),
        ({"prompt": "Q", "chosen": "  ", "rejected": "B"}, r"x\.jsonl:2: field 'chosen' is empty"),
        ({"prompt": "Q", "chosen": "A", "rejected": "B", "margin": "big"}, r"x\.jsonl:2: field 'margin' must be"),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
            r"x\.jsonl:2: fields 'chosen' and 'rejected' differ before their last assistant turn \(at character 9\)",
        ),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "no turns"}, r"x\.jsonl:2: field 'rejected' has no"),
    ],
)
def test_malformed_pairs_are_one_line_errors_naming_file_line_field(tmp_path, row, message):
    first = (
        {"prompt": "Q", "chosen": "A", "rejected": "B"}
        if "prompt" in row
        else {
            "chosen": "\n\nHuman: a\n\nAssistant: b",
            "rejected": "\n\nHuman: a\n\nAssistant: c",
        }
    )
    src = write_jsonl(tmp_path / "x.jsonl", [first, row])
    with pytest.raises(DataError, match=message):
        read_pairs(src)


def test_identical_pairs_are_counted_and_dropped_with_a_note(tmp_path, gpt2_tokenizer):
    src = write_jsonl(
        tmp_path / "i.jsonl",
        [{"prompt": "Q1", "chosen": "A", "rejected": "B"}, {"prompt": "Q2", "chosen": "same", "rejected": " same "}],
    )
    result = load_pairs(DataConfig(sources=[src]), gpt2_tokenizer)
    assert len(result.pairs) == 1 and result.report.identical == 1
    assert f"1 pairs with identical responses dropped, e.g. {src}:2" in result.report.summary()


def pair(p, c, r):
    return EncodedPair(list(range(100, 100 + p)), list(range(1000, 1000 + c)), list(range(2000, 2000 + r)), where="f:1")


def test_cut_pair_keeps_the_prompt_end_and_both_response_starts():
    # Long prompt, short responses: the prompt loses its start, the responses stay whole.
    p = pair(20, 4, 6)
    kept = apply_pair(p, plan_pair(p, "cut_pair", 16))
    assert (
        kept.prompt_ids == p.prompt_ids[-10:]
        and kept.chosen_ids == p.chosen_ids
        and kept.rejected_ids == p.rejected_ids
    )
    # Short prompt, long responses: the whole prompt, responses cut at their end (EOS lost).
    p = pair(3, 30, 12)
    outcome = plan_pair(p, "cut_pair", 16)
    kept = apply_pair(p, outcome)
    assert (
        kept.prompt_ids == p.prompt_ids
        and kept.chosen_ids == p.chosen_ids[:13]
        and kept.rejected_ids == p.rejected_ids[:12]
    )
    assert outcome.responses_cut and outcome.eos_lost and not outcome.prompt_cut
    # Both long: half each. Every kept sequence fits max_len.
    p = pair(40, 40, 3)
    kept = apply_pair(p, plan_pair(p, "cut_pair", 16))
    assert (
        kept.prompt_ids == p.prompt_ids[-8:]
        and kept.chosen_ids == p.chosen_ids[:8]
        and kept.rejected_ids == p.rejected_ids
    )
    assert kept.longest <= 16


def test_pair_policies_and_counts():
    shared = EncodedPair([1, 2], [5, 6, 7, 8, 9, 50], [5, 6, 7, 8, 9, 51])  # same start, differ at the end
    counts = PairTruncationCounts("cut_pair", 6)
    for p in (pair(2, 2, 2), pair(10, 2, 2), shared):
        counts.add(p, plan_pair(p, "cut_pair", 6))
    assert (counts.pairs_in, counts.kept, counts.truncated, counts.prompt_cut, counts.dropped) == (3, 2, 1, 1, 1)
    assert counts.identical_after_cut == 1  # cut to 3 response tokens each, both are [5, 6, 7]
    assert counts.response_tokens_in == 4 + 4 + 12 and counts.response_tokens_out == 8
    assert plan_pair(pair(10, 2, 2), "drop", 6).dropped
    with pytest.raises(DataError, match="f:1: prompt 10 \\+ longer response 2 tokens exceed max_len 6"):
        plan_pair(pair(10, 2, 2), "error", 6)
    with pytest.raises(DataError, match="does not apply to preference pairs"):
        load_pairs(DataConfig(sources=["x.jsonl"], truncation="cut_prompt_left"), None)


def test_length_bias_exact():
    pairs = [pair(1, 5, 3), pair(1, 2, 3), pair(1, 4, 4), pair(1, 9, 1)]
    assert length_bias(pairs) == {"chosen_longer": 0.5, "chosen_shorter": 0.25, "equal": 0.25, "mean_difference": 2.25}


def test_stats_cli_on_preference_data(tmp_path, tokenizer_dir):
    rows = [
        {"prompt": "Q", "chosen": "a b c d", "rejected": "a"},
        {"prompt": "Q", "chosen": "a", "rejected": "a b"},
        {"prompt": "Q", "chosen": "x", "rejected": "x"},
    ]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out"
    assert main(["stats", src, "--tokenizer", str(tokenizer_dir), "--max-len", "8", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kind"] == "preference" and stats["pairs"] == 2 and stats["identical_dropped"] == 1
    assert stats["length_bias"]["chosen_longer"] == 0.5
    assert stats["chosen_tokens"]["sum"] == 4 + 1 + 2  # "a b c d" is 4 tokens, "a" 1, + EOS each
    assert set(stats["truncation"]) == {"cut_pair", "drop", "error"}
    assert (out / "lengths_hist.png").stat().st_size > 0 and "identical pairs dropped" in (out / "stats.md").read_text()


def test_stats_cli_bad_pair_exits_2_and_writes_nothing(tmp_path, tokenizer_dir, capsys):
    src = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}, {"prompt": "Q", "chosen": "A"}]
    )
    out = tmp_path / "out"
    rc = main(["stats", src, "--tokenizer", str(tokenizer_dir), "--out", str(out), "--json", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"qatune stats: error: {src}:2: field 'rejected' is missing"]
    assert not out.exists() and not (tmp_path / "s.json").exists()


def test_encode_pairs_batched_equals_one_by_one(gpt2_tokenizer):
    from qatune.data.preference.records import PreferenceRecord

    records = [PreferenceRecord("s", f"s:{i}", f"yes {i}", f"no {i}", prompt=f"q{i}") for i in range(5)]
    tpl = get_template("plain")
    assert encode_pairs(records, tpl, gpt2_tokenizer, chunk_size=2) == encode_pairs(records, tpl, gpt2_tokenizer)


@pytest.mark.parametrize(
    ("method", "row", "message"),
    [
        ("dpo", {"prompt": "Q", "chosen": "A", "rejected": ""}, "field 'rejected' is empty"),
        (
            "reward",
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: c"},
            "fields 'chosen' and 'rejected' differ before their last assistant turn",
        ),
    ],
)
def test_train_on_a_bad_pair_exits_2_naming_the_line_and_writes_nothing(
    tmp_path, tokenizer_dir, capsys, method, row, message
):
    good = (
        {"prompt": "Q", "chosen": "A", "rejected": "B"}
        if "prompt" in row
        else {**row, "rejected": row["chosen"][:-1] + "d"}
    )
    src = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"out_dir: {tmp_path / 'runs'}\ntokenizer: {tokenizer_dir}\nmethod: {method}\n"
        "model: {name: gpt2, init: random, n_layer: 1, n_embd: 16, n_head: 2, n_positions: 32}\n"
        f"data: {{sources: [{src}], max_len: 32}}\nthreads: 1\n"
    )
    rc = main(["train", str(cfg), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"qatune train: error: {src}:2: ") and message in err[0]
    assert not (tmp_path / "runs").exists()
