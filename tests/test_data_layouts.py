"""No field is dropped unseen, and reading-comprehension (SQuAD-style) layouts keep their passages
and every reference answer."""

from __future__ import annotations

import json

import pytest

from qatune.data.readers import read_records
from qatune.data.records import DataError


def write_jsonl(tmp_path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_an_unused_text_field_is_warned_about_once_per_file_with_its_count(tmp_path):
    rows = [{"passage": f"Text {i}.", "question": f"Q{i}?", "answer": f"A{i}"} for i in range(5)]
    rows[2]["passage"] = "   "  # blank: nothing lost there
    a = write_jsonl(tmp_path, "a.jsonl", rows)
    b = write_jsonl(tmp_path, "b.jsonl", rows[:2])
    result = read_records([a, b])
    assert len(result) == 7
    assert result.warnings == [
        f"{a}: field 'passage' holds text in 4 of 5 records, but layout question_answer (question, answer) "
        "does not use it; to use it, give a mapping: prompt=question response=answer context=passage",
        f"{b}: field 'passage' holds text in 2 of 2 records, but layout question_answer (question, answer) "
        "does not use it; to use it, give a mapping: prompt=question response=answer context=passage",
    ]


def test_identifiers_and_used_fields_are_not_warned_about(tmp_path):
    rows = [{"id": "5733be28", "title": "Notre_Dame", "instruction": "i", "input": "x", "output": "o", "n": 3}]
    assert read_records(write_jsonl(tmp_path, "a.jsonl", rows)).warnings == []
    mapped = write_jsonl(tmp_path, "m.jsonl", [{"q": "Q?", "a": "A", "ctx": "C"}])
    result = read_records(mapped, mapping={"prompt": "q", "response": "a"})
    assert [w.split(": ", 1)[1] for w in result.warnings] == [
        "field 'ctx' holds text in 1 of 1 records, but the mapping (prompt=q response=a) does not use it; "
        "to use it, give a mapping: prompt=q response=a context=ctx"
    ]


def test_context_question_answer_keeps_the_passage(tmp_path):
    row = {"context": "Paris is in France.", "question": "Where?", "answer": "France"}
    path = write_jsonl(tmp_path, "rc.jsonl", [row])
    result = read_records(path)
    assert result.layouts[path] == "context_question_answer" and result.warnings == []
    (r,) = result.records
    assert (r.prompt, r.context, r.response) == ("Where?", "Paris is in France.", "France")


SQUAD_HF = {
    "id": "56be4db0acb8001400a502ec",
    "title": "Super_Bowl_50",
    "context": "Super Bowl 50 was an American football game. The Denver Broncos won.",
    "question": "Which team won Super Bowl 50?",
    "answers": {"text": ["Denver Broncos", "the Denver Broncos", "Denver Broncos"], "answer_start": [177, 173, 177]},
}


@pytest.mark.parametrize(
    "answers",
    [
        SQUAD_HF["answers"],
        ["Denver Broncos", "the Denver Broncos"],
        [{"text": "Denver Broncos", "answer_start": 177}, {"text": "the Denver Broncos", "answer_start": 173}],
    ],
    ids=["hf_dict", "list", "list_of_objects"],
)
def test_squad_answers_first_is_the_response_all_are_references(tmp_path, answers):
    path = write_jsonl(tmp_path, "squad.jsonl", [{**SQUAD_HF, "answers": answers}])
    result = read_records(path)
    assert result.layouts[path] == "squad" and result.warnings == []
    (r,) = result.records
    assert r.prompt == SQUAD_HF["question"] and r.context == SQUAD_HF["context"]
    assert r.response == r.reference == "Denver Broncos"
    assert r.references == ["Denver Broncos", "the Denver Broncos"]  # duplicates kept once


def test_question_answers_without_context(tmp_path):
    path = write_jsonl(tmp_path, "nq.jsonl", [{"question": "Capital of Peru?", "answers": ["Lima", "Lima, Peru"]}])
    (r,) = read_records(path).records
    assert (r.prompt, r.context, r.response, r.references) == ("Capital of Peru?", "", "Lima", ["Lima", "Lima, Peru"])


@pytest.mark.parametrize(
    ("answers", "pattern"),
    [
        ({"text": [], "answer_start": []}, r"squad\.jsonl:1: field 'answers' is empty \(an unanswerable question\?"),
        ([], r"squad\.jsonl:1: field 'answers' is empty"),
        (["ok", 3], r"squad\.jsonl:1: field 'answers\[1\]' must be a string, got int"),
        ({"answer_start": [1]}, r"squad\.jsonl:1: field 'answers' must be a list of strings or"),
    ],
)
def test_bad_answers_name_the_field(tmp_path, answers, pattern):
    path = write_jsonl(tmp_path, "squad.jsonl", [{**SQUAD_HF, "answers": answers}])
    with pytest.raises(DataError, match=pattern):
        read_records(path)


def test_eval_scores_the_best_reference(tmp_path):
    from qatune.generation.batch import PromptItem, make_record

    class Tok:
        def decode(self, ids):
            return "the Denver Broncos team"

        def __call__(self, text):
            return type("E", (), {"input_ids": text.split()})()

    item = PromptItem("w", "s", "q", "Question: q\nAnswer:", "Broncos", ["Broncos", "the Denver Broncos team"])
    record = make_record(0, item, [1, 2], True, False, Tok())
    assert record["exact_match"] == 1.0 and record["f1"] == 1.0 and record["rouge_l"] == 1.0
    assert record["references"] == ["Broncos", "the Denver Broncos team"]


def test_the_official_squad_json_is_one_row_per_question(tmp_path):
    doc = {
        "version": "1.1",
        "data": [
            {
                "title": "Super_Bowl_50",
                "paragraphs": [
                    {
                        "context": SQUAD_HF["context"],
                        "qas": [
                            {
                                "id": "a",
                                "question": "Who won?",
                                "answers": [{"text": "Denver Broncos", "answer_start": 1}],
                            },
                            {
                                "id": "b",
                                "question": "Which game?",
                                "answers": [{"text": "Super Bowl 50", "answer_start": 0}],
                            },
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "train-v1.1.json"
    path.write_text(json.dumps(doc))
    result = read_records(str(path))
    assert [(r.prompt, r.context, r.response) for r in result] == [
        ("Who won?", SQUAD_HF["context"], "Denver Broncos"),
        ("Which game?", SQUAD_HF["context"], "Super Bowl 50"),
    ]
    assert result.records[1].where == f"{path}:data[0].paragraphs[0].qas[1]"
    assert result.notes == [f"{path}: read as SQuAD articles from field 'data' (2 questions)"] and not result.warnings


def test_stats_prints_the_warning(tmp_path, tokenizer_dir, capsys):
    from qatune.cli import main

    path = write_jsonl(tmp_path, "a.jsonl", [{"passage": "P.", "question": "Q?", "answer": "A"}])
    assert main(["stats", path, "--tokenizer", str(tokenizer_dir), "--json", str(tmp_path / "s.json")]) == 0
    assert f"warning: {path}: field 'passage' holds text in 1 of 1 records" in capsys.readouterr().err
    assert json.loads((tmp_path / "s.json").read_text())["warnings"][0].startswith(f"{path}: field 'passage'")
