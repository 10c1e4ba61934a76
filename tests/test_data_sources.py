"""Where data comes from: a missing local path is an error at once (never a hub request), an
unreachable hub fails in seconds with one line, and hub data sets are named as users write them
(config/subset, data_files, save_to_disk folders, streaming). No test touches the network: the hub
boundary (`datasets.load_dataset`, the socket) is faked."""

from __future__ import annotations

import json
import socket
import time

import datasets
import pytest

from qatune.config import from_dict
from qatune.data.pipeline import DataConfig
from qatune.data.readers import read_records
from qatune.data.records import DataError

ROWS = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)]


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub call fails the test."""

    def called(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", called)
    monkeypatch.setattr(socket, "create_connection", called)


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answered locally; returns the list of calls."""
    calls = []

    def load(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load)
    return calls


@pytest.mark.parametrize("name", ["./nope", "../nope/train.jsonl", "/nonexistent", "~/nope", "a/b/c", "data/train/"])
def test_a_missing_local_path_is_an_error_without_asking_the_hub(no_hub, name):
    with pytest.raises(DataError, match=r": no such file or folder"):
        read_records(name)


def test_org_slash_name_beside_a_folder_of_that_name_is_a_path(no_hub, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^data/train: no such file or folder"):
        read_records("data/train")


def test_an_unreachable_hub_fails_in_seconds_with_one_line(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(address, timeout=None, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset called while offline"))
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        read_records("openai/gsm8k:main")
    assert time.perf_counter() - t0 < 5
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("openai/gsm8k:main: not a local file or folder, and the Hugging Face hub")
    assert "cannot be reached" in message and "save_to_disk" in message and "HF_HUB_OFFLINE=1" in message


def test_offline_mode_uses_the_cache_and_says_so_when_it_misses(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def miss(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", miss)
    with pytest.raises(DataError, match=r"^org/set: not in the local cache \(HF_HUB_OFFLINE is set\)"):
        read_records("org/set")


@pytest.mark.parametrize(
    ("spec", "call"),
    [
        ("openai/gsm8k:main", ("openai/gsm8k", "main", "train")),
        ("openai/gsm8k:main:test", ("openai/gsm8k", "main", "test")),
        ("org/set:test", ("org/set", None, "test")),
        ("org/set:validation[:10]", ("org/set", None, "validation[:10]")),
        ("hf:squad", ("squad", None, "train")),
    ],
)
def test_config_and_split_in_the_name(fake_hub, monkeypatch, spec, call):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no probe: the fake answers
    result = read_records(spec)
    assert [c[:3] for c in fake_hub] == [call] and len(result) == 4


def test_a_source_given_as_a_mapping(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = from_dict(DataConfig, {"sources": [{"hub": "openai/gsm8k", "config": "main", "split": "test"}]})
    result = read_records(cfg.sources)
    assert [c[:3] for c in fake_hub] == [("openai/gsm8k", "main", "test")]
    assert result.layouts == {"openai/gsm8k:main:test": "question_answer"}
    assert result.records[0].where == "openai/gsm8k:main:test[0]"
    with pytest.raises(DataError, match=r"data source: unknown key 'splt'; known keys: hub, path, config, split"):
        read_records([{"hub": "x/y", "splt": "test"}])


def test_data_files_through_the_datasets_builder(tmp_path, monkeypatch):
    """Real `datasets` code, local files only: the json builder with data_files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for i in range(2):
        (tmp_path / f"part{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[2 * i : 2 * i + 2]))
    source = {"hub": "json", "data_files": [str(tmp_path / "part0.jsonl"), str(tmp_path / "part1.jsonl")]}
    result = read_records([source])
    assert [r.response for r in result] == ["a0", "a1", "a2", "a3"]


def test_save_to_disk_folders(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    result = read_records(str(tmp_path / "one"))
    assert [r.response for r in result] == ["a0", "a1", "a2", "a3"]
    assert result.records[0].where == f"{tmp_path / 'one'}[0]"
    splits = {"train": datasets.Dataset.from_list(ROWS[:3]), "test": datasets.Dataset.from_list(ROWS[3:])}
    dd = datasets.DatasetDict(splits)
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(read_records(str(tmp_path / "dict"))) == 3  # the train split by default
    assert [r.response for r in read_records([{"path": str(tmp_path / "dict"), "split": "test"}])] == ["a3"]
    with pytest.raises(DataError, match=r"dict: no split 'dev'; splits: train, test"):
        read_records([{"path": str(tmp_path / "dict"), "split": "dev"}])


def test_streaming_reads_only_what_it_needs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pulled = []

    def rows():
        for i in range(10**9):  # far more than memory would hold as a list
            pulled.append(i)
            yield {"question": f"q{i}", "answer": f"a{i}"}

    def load(path, name=None, split=None, streaming=False, **kwargs):
        assert streaming, "a streamed source must be loaded with streaming=True"
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", load)
    result = read_records([{"hub": "big/set", "streaming": True}], limit=5)
    assert [r.response for r in result] == ["a0", "a1", "a2", "a3", "a4"]
    assert len(pulled) < 100
