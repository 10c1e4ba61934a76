"""Malformed files end in one line naming the file and the line or row (CLI: exit 2), never a
traceback and never a partial result; JSON objects that are clearly a table are read, and said so."""

from __future__ import annotations

import json

import pytest

from qatune.cli import main
from qatune.data.readers import read_records
from qatune.data.records import DataError


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_dict_of_columns_is_read_as_rows_and_said_so(tmp_path):
    path = write(tmp_path, "cols.json", json.dumps({"question": ["q1", "q2"], "answer": ["a1", "a2"]}))
    result = read_records(path)
    assert [(r.prompt, r.response) for r in result] == [("q1", "a1"), ("q2", "a2")]
    assert [r.where for r in result] == [f"{path}:row 1", f"{path}:row 2"]
    assert result.notes == [f"{path}: read as a table of columns (question, answer), 2 rows"]


def test_one_list_field_of_records_is_read_and_said_so(tmp_path):
    doc = {"version": "1.0", "items": [{"question": "q", "answer": "a"}]}
    path = write(tmp_path, "wrapped.json", json.dumps(doc))
    result = read_records(path)
    assert [(r.prompt, r.response) for r in result] == [("q", "a")]
    assert result.notes == [f"{path}: records read from field 'items' (1 records)"]


@pytest.mark.parametrize(
    ("doc", "pattern"),
    [
        ({"question": "q", "answer": "a"}, r"o\.json: the top level is an object with fields \[answer, question\], "),
        ({"question": ["q1", "q2"], "answer": ["a1"]}, r"o\.json: columns of different lengths: question 2, answer 1"),
        (
            {"a": [{"question": "q"}], "b": [{"question": "q"}]},
            r"o\.json: the top level is an object with fields \[a, b",
        ),
        ("text", r"o\.json: expected a list of records, got str"),
    ],
    ids=["one_record", "uneven_columns", "two_lists", "string"],
)
def test_other_top_levels_are_one_clear_error(tmp_path, doc, pattern):
    with pytest.raises(DataError, match=pattern):
        read_records(write(tmp_path, "o.json", json.dumps(doc)))


def test_pathologically_nested_json_names_the_line(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(DataError, match=r"d\.json:3: JSON nested deeper than"):
        read_records(write(tmp_path, "d.json", '[\n {"question": "q",\n "answer": ' + deep + "}]"))
    row = json.dumps({"question": "q", "answer": "a"})
    with pytest.raises(DataError, match=r"d\.jsonl:2: JSON nested deeper than"):
        read_records(write(tmp_path, "d.jsonl", f"{row}\n{deep}\n{row}\n"))


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("question,answer\nq1,a1\nq2,a2,extra\n", r"c\.csv:3: row has 3 fields, the header has 2 \(question, answer\)"),
        ("question,answer\nq1,a1\nq2\n", r"c\.csv:3: row has 1 field, the header has 2"),
        ('question,answer\n"multi\nline",a\nq,a,b\n', r"c\.csv:4: row has 3 fields"),
        ("question,question\nq,a\n", r"c\.csv:1: the header names field 'question' twice"),
    ],
    ids=["more", "fewer", "after_multiline_cell", "duplicate_header"],
)
def test_csv_rows_must_match_the_header(tmp_path, text, pattern):
    with pytest.raises(DataError, match=pattern):
        read_records(write(tmp_path, "c.csv", text))


def test_blank_csv_lines_are_not_rows(tmp_path):
    assert len(read_records(write(tmp_path, "c.csv", "question,answer\nq1,a1\n\nq2,a2\n"))) == 2


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("o.json", json.dumps({"question": "q", "answer": "a"}), "o.json: the top level is an object"),
        ("d.json", "[" * 50_000 + "]" * 50_000, "d.json:1: JSON nested deeper than"),
        ("c.csv", "question,answer\nq,a\nq,a,b\n", "c.csv:3: row has 3 fields"),
    ],
)
def test_cli_gives_one_line_exit_2_and_writes_nothing(tmp_path, tokenizer_dir, capsys, name, text, where):
    path = write(tmp_path, name, text)
    out = tmp_path / "s.json"
    assert main(["stats", path, "--tokenizer", str(tokenizer_dir), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and where in err and "Traceback" not in err
    assert not out.exists()
