"""Readers and layouts: every format and layout from small fixtures, a field mapping, and errors
that name the file, the line or record, and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatune.data.pipeline import DataConfig, load_examples
from qatune.data.readers import read_records
from qatune.data.records import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def fx(name: str) -> str:
    return str(FIXTURES / name)


def pairs(result):
    return [(r.prompt, r.context, r.response) for r in result]


def test_alpaca_json_array():
    result = read_records(fx("alpaca.json"))
    assert result.layouts == {fx("alpaca.json"): "alpaca"}
    assert pairs(result) == [
        ("Give three tips for staying healthy.", "", "Eat well, sleep enough, move every day."),
        ("Translate to French.", "Good morning", "Bonjour"),
    ]
    assert [r.where for r in result] == [f"{fx('alpaca.json')}:record 1", f"{fx('alpaca.json')}:record 2"]


def test_prompt_completion_jsonl_keeps_line_numbers_across_blank_lines():
    result = read_records(fx("prompt_completion.jsonl"))
    assert result.layouts[fx("prompt_completion.jsonl")] == "prompt_completion"
    assert pairs(result)[1] == ("Name a prime number.\n", "", "Seven<|endoftext|>")
    assert result.records[1].where.endswith("prompt_completion.jsonl:3")


def test_question_answer_csv_with_multiline_cell_and_unicode():
    result = read_records(fx("question_answer.csv"))
    assert result.layouts[fx("question_answer.csv")] == "question_answer"
    assert pairs(result) == [
        ("What is 2+2?", "", "4"),
        ("Write two lines.", "", "First line,\nsecond line."),
        ("Xin chào là gì?", "", "Hello 👋"),
    ]
    assert [r.where.rsplit(":", 1)[1] for r in result] == ["2", "3", "5"]  # physical lines


def test_dolly_with_context_and_extra_fields():
    result = read_records(fx("dolly.jsonl"))
    assert result.layouts[fx("dolly.jsonl")] == "dolly"
    assert pairs(result)[0] == ("Who wrote Hamlet?", "Hamlet is a tragedy written around 1600.", "William Shakespeare")


def test_messages_multi_turn():
    (rec,) = read_records(fx("messages.jsonl")).records
    assert [(m.role, m.content) for m in rec.messages] == [
        ("system", "You are terse."),
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "2+2?"),
        ("assistant", "4"),
    ]
    assert rec.reference == "4"


def test_self_instruct_one_record_per_instance():
    result = read_records(fx("self_instruct.jsonl"))
    assert result.layouts[fx("self_instruct.jsonl")] == "self_instruct"
    assert pairs(result) == [("Give the antonym.", "hot", "cold"), ("Give the antonym.", "up", "down")]
    assert result.records[1].where.endswith("self_instruct.jsonl:1:instances[1]")


def test_field_mapping():
    result = read_records(fx("mapped.jsonl"), mapping={"prompt": "q", "response": "a", "context": "ctx"})
    assert result.layouts[fx("mapped.jsonl")] == "mapping"
    assert pairs(result) == [("Capital of Italy?", "Europe", "Rome")]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2", "q3"], "answer": ["a1", "a2", "a3"]}), path, row_group_size=2)
    result = read_records(str(path))
    assert pairs(result) == [("q1", "", "a1"), ("q2", "", "a2"), ("q3", "", "a3")]
    assert result.records[2].where == f"{path}:row 3"


def test_several_sources_keep_per_source_layouts():
    result = read_records([fx("p*.jsonl"), fx("alpaca.json"), fx("question_answer.csv")])
    assert list(result.layouts.items()) == [
        (fx("prompt_completion.jsonl"), "prompt_completion"),
        (fx("alpaca.json"), "alpaca"),
        (fx("question_answer.csv"), "question_answer"),
    ]
    assert [r.source for r in result] == [fx("prompt_completion.jsonl")] * 2 + [fx("alpaca.json")] * 2 + [
        fx("question_answer.csv")
    ] * 3


def test_folder_reads_every_data_file_and_names_the_one_without_a_layout():
    with pytest.raises(DataError, match=r"mapped\.jsonl:1: unknown layout: fields \['a', 'ctx', 'q'\]"):
        read_records(str(FIXTURES))


def test_glob_and_limit():
    result = read_records([fx("d*.jsonl"), fx("s*.jsonl")], limit=3)
    assert result.layouts == {fx("dolly.jsonl"): "dolly", fx("self_instruct.jsonl"): "self_instruct"}
    assert [r.response for r in result] == ["William Shakespeare", "Blue", "cold"]


def test_hugging_face_dataset_name(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"instruction": "Say hi", "input": "", "output": "hi"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    result = read_records(["tatsu-lab/alpaca", "hf:org/set:test"])
    assert calls == [("tatsu-lab/alpaca", "train"), ("org/set", "test")]
    assert result.layouts == {"tatsu-lab/alpaca": "alpaca", "org/set:test": "alpaca"}
    assert result.records[1].where == "org/set:test[0]" and result.records[0].source == "tatsu-lab/alpaca"


def write(tmp_path, name, data: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


ROW = json.dumps({"prompt": "p", "completion": "c"})

ERRORS = [
    ("bad_json", "a.jsonl", f'{ROW}\n{{"prompt": "p", \n', r"a\.jsonl:2: invalid JSON \(Expecting property name"),
    ("missing", "a.jsonl", f'{ROW}\n{{"prompt": "p"}}\n', r"a\.jsonl:2: field 'completion' is missing"),
    ("empty", "a.jsonl", f'{ROW}\n{{"prompt": "  ", "completion": "c"}}\n', r"a\.jsonl:2: field 'prompt' is empty"),
    (
        "not_string",
        "a.jsonl",
        f'{ROW}\n{{"prompt": 3, "completion": "c"}}\n',
        r"a\.jsonl:2: field 'prompt' must be a string, got int",
    ),
    ("null", "a.jsonl", f'{ROW}\n{{"prompt": null, "completion": "c"}}\n', r"a\.jsonl:2: field 'prompt' is missing"),
    ("not_object", "a.jsonl", f"{ROW}\n[1, 2]\n", r"a\.jsonl:2: a record must be an object"),
    (
        "utf8",
        "a.jsonl",
        ROW.encode() + b'\n{"prompt": "caf\xe9", "completion": "c"}\n',
        r"a\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)",
    ),
    ("unknown", "a.jsonl", '{"text": "x"}\n', r"a\.jsonl:1: unknown layout: fields \['text'\]"),
    (
        "role",
        "m.jsonl",
        '{"messages": [{"role": "bot", "content": "x"}]}\n',
        r"m\.jsonl:1: field 'messages\[0\]\.role' is 'bot'",
    ),
    (
        "content",
        "m.jsonl",
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}\n',
        r"m\.jsonl:1: messages\[1\]: field 'content' is missing",
    ),
    ("csv_empty", "a.csv", "question,answer\nq,a\nq2,\n", r"a\.csv:3: field 'answer' is empty"),
    ("csv_utf8", "a.csv", b"question,answer\nq,a\nq2,\xff\n", r"a\.csv:3: not valid UTF-8"),
    (
        "json",
        "a.json",
        '[{"question": "q", "answer": "a"},\n {"question": "q"}]',
        r"a\.json:record 2: field 'answer' is missing",
    ),
    ("json_syntax", "a.json", '[{"question": "q",\n "answer": }]', r"a\.json:2: invalid JSON"),
    (
        "self_instruct",
        "s.jsonl",
        '{"instruction": "i", "instances": [{"input": "", "output": ""}]}\n',
        r"s\.jsonl:1: instances\[0\]: field 'output' is empty",
    ),
    ("parquet", "a.parquet", b"not parquet", r"a\.parquet: cannot read as Parquet"),
    ("suffix", "a.txt", "x", r"a\.txt: unsupported file type '\.txt'"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_each_error_names_file_line_and_field(tmp_path, case):
    _, name, data, pattern = case
    path = write(tmp_path, name, data)
    with pytest.raises(DataError, match=pattern):
        read_records(path)


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or folder"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"\*\.csv: no file matches this pattern"):
        read_records(str(tmp_path / "*.csv"))


def test_unreadable_file(tmp_path, monkeypatch):
    """The OS refuses the read (mode 000 for a normal user; simulated, since tests may run as root)."""
    path = write(tmp_path, "a.jsonl", ROW)
    real = Path.read_bytes

    def refuse(self):
        if str(self) == path:
            raise PermissionError(13, "Permission denied", path)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(DataError, match=r"a\.jsonl: cannot read file \(Permission denied\)"):
        read_records(path)


def test_skip_bad_counts_and_keeps_first_reasons(tmp_path):
    lines = [ROW] + ['{"prompt": "p"}'] * 4 + ["{oops"] * 3 + [ROW]
    path = write(tmp_path, "a.jsonl", "\n".join(lines) + "\n")
    result = read_records(path, skip_bad=True)
    assert len(result) == 2 and result.skipped == 7
    assert len(result.skip_reasons) == 5
    assert result.skip_reasons[0].endswith("a.jsonl:2: field 'completion' is missing")
    assert result.skip_reasons[4].endswith(
        "a.jsonl:6: invalid JSON (Expecting property name enclosed in double quotes at column 2)"
    )


def test_load_examples_reports_layouts_skips_and_truncation(tmp_path, gpt2_tokenizer):
    path = write(tmp_path, "a.jsonl", "\n".join([ROW, '{"prompt": 1, "completion": "c"}', ROW]) + "\n")
    long = json.dumps({"question": "word " * 50, "answer": "ok " * 50})
    qa = write(tmp_path, "b.jsonl", long + "\n")
    cfg = DataConfig(sources=[path, qa], max_len=64, skip_bad=True)
    result = load_examples(cfg, gpt2_tokenizer)
    assert result.layouts == {path: "prompt_completion", qa: "question_answer"}
    t = result.report.to_dict()["truncation"]
    assert (t["examples_in"], t["kept"], t["truncated"], t["dropped"], t["eos_lost"]) == (3, 3, 1, 0, 1)
    assert result.report.skipped == 1 and "a.jsonl:2: field 'prompt' must be a string" in result.report.skip_reasons[0]
    assert max(len(e) for e in result.examples) == 64
    assert [e.source for e in result.examples] == [path, path, qa]
    with pytest.raises(DataError, match=r"b\.jsonl:1: 1\d\d tokens .* exceed max_len 64"):
        load_examples(DataConfig(sources=[qa], max_len=64, truncation="error"), gpt2_tokenizer)


def test_data_config_from_yaml_mapping_and_template_dict():
    from qatune.config import ConfigError, from_dict

    cfg = from_dict(
        DataConfig,
        {"sources": "x.jsonl", "mapping": {"prompt": "q", "response": "a"}, "template": {"prompt": "Q: {prompt}\nA:"}},
    )
    assert cfg.sources == ["x.jsonl"] and cfg.get_template().render_prompt("hi") == "Q: hi\nA:"
    with pytest.raises(ValueError, match="truncation: 'cut' is not one of cut_response"):
        from_dict(DataConfig, {"truncation": "cut"})
    with pytest.raises(ConfigError, match="unknown config key 'max_length'"):
        from_dict(DataConfig, {"max_length": 3})


def test_hugging_face_failure_says_it_is_neither_file_nor_dataset(monkeypatch):
    import datasets

    def fail(name, config=None, split=None):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("qatune.data.hf_datasets.unreachable_reason", lambda: None)  # as if online
    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match=r"data/train: not a local file or folder, and cannot load it as Hugging Face"):
        read_records("data/train")
