"""User mistakes and qatune's own bugs, told apart by the CLI: a mistake the user can fix is one
line `qatune CMD: error: ...` and exit 2; any other exception is a bug, shown with its traceback and
a line saying so, and exit 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import qatune.cli.info
from qatune import __version__
from qatune.cli import main
from qatune.config import ConfigError
from qatune.data.records import DataError
from qatune.errors import RunError, UserError
from qatune.export import CheckpointFolderError
from qatune.model.hf_io import CheckpointError
from qatune.model.tokenizer import TokenizerError


def raising(error: BaseException):
    """A stand-in for a function deep in a command that raises `error`."""

    def raise_it(*args, **kwargs):
        raise error

    return raise_it


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_qatune_errors_are_user_errors_and_still_value_errors():
    for cls in (ConfigError, DataError, TokenizerError, CheckpointError, CheckpointFolderError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)


def test_a_bad_config_key_is_one_line_and_exit_2(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("name: x\noptim:\n  lrr: 0.1\n")
    assert main(["train", str(config)]) == 2
    line = one_line(capsys)
    assert line.startswith(f"qatune train: error: {config}: unknown config key 'optim.lrr'")


def test_a_bad_data_field_is_one_line_and_exit_2(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q", "answer": 5}\n')
    assert main(["stats", str(bad), "--tokenizer", str(tokenizer_dir)]) == 2
    assert one_line(capsys) == f"qatune stats: error: {bad}:2: field 'answer' must be a string, got int"


def test_missing_files_the_user_named_are_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["train", str(missing)]) == 2
    assert one_line(capsys) == f"qatune train: error: cannot read config {missing}: No such file or directory"
    assert main(["stats", str(tmp_path / "nope.jsonl")]) == 2
    assert one_line(capsys) == f"qatune stats: error: {tmp_path / 'nope.jsonl'}: no such file or folder"


@pytest.mark.parametrize(
    "error",
    [FileNotFoundError(2, "No such file or directory", "data/x.jsonl"),
     PermissionError(13, "Permission denied", "data/x.jsonl"),
     IsADirectoryError(21, "Is a directory", "data/x.jsonl")],
)  # fmt: skip
def test_an_os_error_on_a_file_is_one_line_naming_it(monkeypatch, capsys, error):
    # Any path qatune opens was named by the user (or lies in a folder they named).
    monkeypatch.setattr(qatune.cli.info, "config_of", raising(error))
    assert main(["info", "gpt2"]) == 2
    assert one_line(capsys) == f"qatune info: error: data/x.jsonl: {error.strerror}"


@pytest.mark.parametrize(
    "error", [ValueError("an internal invariant broke"), KeyError("reward"), TypeError("bad operand")]
)
def test_any_other_exception_is_shown_as_a_bug_with_its_traceback(monkeypatch, capsys, error):
    monkeypatch.setattr(qatune.cli.info, "config_of", raising(error))
    assert main(["info", "gpt2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert any("in raise_it" in line for line in err)  # the frame that raised
    assert f"{type(error).__name__}: " in err[-2] and str(error).strip("'") in err[-2]
    assert err[-1] == (
        f"qatune info: internal error: this is a bug in qatune {__version__}, not in your input; "
        "please report it with the traceback above"
    )


def test_interrupt_and_run_errors_keep_their_exits(monkeypatch, capsys):
    monkeypatch.setattr(qatune.cli.info, "config_of", raising(KeyboardInterrupt()))
    assert main(["info", "gpt2"]) == 130
    assert one_line(capsys) == "qatune info: interrupted"

    stop = RunError("the KL left its band: lower the learning rate", exit_code=1)
    monkeypatch.setattr(qatune.cli.info, "config_of", raising(stop))
    assert main(["info", "gpt2"]) == 1
    assert one_line(capsys) == "qatune info: the KL left its band: lower the learning rate"


def test_the_installed_entry_point_reports_a_user_error_in_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: sft\ndata:\n  max_lenn: 64\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "qatune", "train", str(config)], capture_output=True, text=True, env=env, timeout=120
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1
    assert lines[0].startswith(f"qatune train: error: {config}: unknown config key 'data.max_lenn'")


def test_overrides_may_follow_the_options():
    """`qatune train c.yaml --resume optim.lr=1e-4`: argparse alone refused the override after an option."""
    from qatune.cli import parse

    args = parse(["train", "c.yaml", "data.max_len=64", "--resume", "optim.lr=1e-4", "--no-progress"])
    assert args.overrides == ["data.max_len=64", "optim.lr=1e-4"] and args.resume and not args.progress
    assert parse(["check", "c.yaml", "--sample", "8", "data.max_len=64"]).overrides == ["data.max_len=64"]


@pytest.mark.parametrize("argv", [["train", "c.yaml", "--resume", "--bogus"], ["info", "gpt2", "a=b"]])
def test_other_extra_arguments_are_still_refused(argv, capsys):
    from qatune.cli import parse

    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
