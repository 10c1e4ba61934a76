"""The documented path is the tested path: every shipped config, every method, every command the
README and the demo print, run through the CLI as a user types it, with the progress display on,
on a pipe and on a terminal. Substitutions (sizes, offline) are listed in tests/documented.py."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from documented import (
    PROGRESS_SHOWN,
    SFT_COPIES,
    SFT_RUN,
    SMALL_RL,
    SMALL_RUN,
    TINY_MODEL,
    Command,
    Result,
    argv_for,
    demo_next_commands,
    environment,
    make_workspace,
    readme_commands,
    run_pipe,
    run_tty,
    skip_reason,
    train_overrides,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
README = REPO / "README.md"


def check_ok(result: Result) -> None:
    assert result.code == 0 and "Traceback" not in result.output, str(result)


def check_train(result: Result, cwd: Path, steps: int = 2) -> Path:
    """A finished run: its folder has `steps` metrics records, the last checkpoint and an export."""
    check_ok(result)
    found = re.search(rf"trained {steps} steps -> (\S+?);", result.output)
    assert found, str(result)
    run = cwd / found.group(1)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == steps, records
    assert (run / "checkpoints" / f"step_{steps:08d}").is_dir()
    assert (run / "export" / "config.json").exists() and (run / "config.yaml").exists()
    return run


# --- the workspace the README's commands share ---------------------------------------------------


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, tokenizer_dir, data_dir, hf_tiny_dir):
    """The folder every documented command runs in; the demo has run there (on a terminal, as a user
    runs it first), and so have the SFT runs the README's later commands start from."""
    work = make_workspace(tmp_path_factory.mktemp("documented"), data_dir.parent, REPO)
    demo = run_tty(argv_for("qatune demo", work, hf_tiny_dir), work)
    check_ok(demo)
    assert "held-out exact match after 20 steps" in demo.output, str(demo)
    assert (work / "runs" / "demo" / "export" / "qatune.json").exists()
    run, command = SFT_RUN
    check_train(run_pipe(argv_for(command, work, hf_tiny_dir), work), work)
    for copy in SFT_COPIES:
        shutil.copytree(work / run, work / copy)
    return work, demo


def test_readme_commands_are_run_or_listed():
    """Every README command is one this file runs (qatune, python -c, curl against `qatune serve`) or
    in SKIPPED with its reason; a SKIPPED entry no longer documented is stale."""
    commands = readme_commands(README.read_text(encoding="utf-8"))
    texts = [c.text for c in commands]
    assert any(t.startswith("qatune train") for t in texts) and any(t == "qatune demo" for t in texts)
    for c in commands:
        first = shlex.split(c.text)[0]
        listed = first in ("qatune", "python", "curl") or skip_reason(c.text)
        assert listed, f"{c.where}: neither run nor listed: {c.text}"
        if first == "python" and not skip_reason(c.text):
            assert shlex.split(c.text)[1] == "-c", f"{c.where}: {c.text}"
    from documented import SKIPPED

    for prefix in SKIPPED:
        assert any(t.startswith(prefix) for t in texts), f"SKIPPED entry {prefix!r} is no longer in the README"


def test_readme_parsing():
    text = "x\n```bash\nqatune a b \\\n  c   # why\n# comment\npip x && qatune d 'e=[f]'\n```\n"
    text += "```\n$ qatune g\nout\n```\n"
    got = [(c.text, c.where, c.block) for c in readme_commands(text)]
    assert got == [
        ("qatune a b c", "README.md:3", 1),
        ("pip x", "README.md:6", 1),
        ("qatune d 'e=[f]'", "README.md:6", 1),
        ("qatune g", "README.md:9", 2),
    ]


# --- every shipped config -----------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_trains(config, tmp_path, data_dir, hf_tiny_dir):
    """On a pipe (CI, `| tee`): the plain progress lines. Every method runs on a terminal below."""
    work = make_workspace(tmp_path, data_dir.parent, REPO)
    result = run_pipe(argv_for(f"qatune train configs/{config.name}", work, hf_tiny_dir), work)
    run = check_train(result, work)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    shipped = yaml.safe_load(config.read_text())
    assert saved["method"] == shipped.get("method", "sft") and saved["name"] == shipped["name"]
    assert "step 2/2  loss" in result.output, str(result)  # the plain progress line


# --- every method, with its defaults ------------------------------------------------------------

METHOD_DATA = {  # the data each method trains on (records that method reads), and what else it needs
    "sft": ("gsm8k/train.jsonl", []),
    "dpo": ("hh_rlhf_harmless/test.jsonl", []),
    "reward": ("hh_rlhf_harmless/test.jsonl", []),
    "ppo": ("gsm8k/train.jsonl", ["rl.reward=numeric"]),
    "grpo": ("gsm8k/train.jsonl", ["rl.reward=numeric"]),
}


def test_every_method_is_covered():
    from qatune.methods import METHODS

    assert set(METHODS) == set(METHOD_DATA)


@pytest.mark.parametrize("method", list(METHOD_DATA))
def test_method_trains_with_its_defaults(method, tmp_path, data_dir, tokenizer_dir, hf_tiny_dir):
    """`method: X` and the data, nothing else but sizes: the defaults of every method must work, on a
    terminal, where rich draws the progress bar with the method's metrics."""
    work = make_workspace(tmp_path, data_dir.parent, REPO)
    source, needs = METHOD_DATA[method]
    config = {
        "name": f"{method}-defaults",
        "method": method,
        "tokenizer": str(tokenizer_dir),
        "model": {"name": "gpt2"},
        "data": {"sources": [str(data_dir / source)]},
    }
    (work / "run.yaml").write_text(yaml.safe_dump(config))
    sizes = TINY_MODEL + SMALL_RUN + (SMALL_RL if method in ("ppo", "grpo") else [])
    argv = [sys.executable, "-m", "qatune", "train", "run.yaml", *sizes, *needs]
    result = run_tty(argv, work)
    run = check_train(result, work)
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == method
    assert re.search(r"train .*2/2", result.output), str(result)  # rich's bar, finished
    for shown in PROGRESS_SHOWN[method]:  # the fields the method declares, on the bar
        assert shown in result.output, (shown, result.output[-2000:])


# --- the README's commands and the demo's -------------------------------------------------------


def readme_blocks() -> list[list[Command]]:
    blocks: dict[int, list[Command]] = {}
    for c in readme_commands(README.read_text(encoding="utf-8")):
        blocks.setdefault(c.block, []).append(c)
    return list(blocks.values())


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: b[0].where)
def test_readme_block_runs_as_printed(block, workspace, hf_tiny_dir):
    """The commands of one README code block, in order, in the shared workspace."""
    work, demo = workspace
    server = None
    try:
        for c in block:
            if skip_reason(c.text):
                continue
            if c.text.startswith("qatune demo"):  # the workspace ran it (on a terminal)
                check_demo(demo)
                continue
            if c.text.startswith("curl "):
                assert server, f"{c.where}: curl with no `qatune serve` before it"
                check_curl(c.text, server)
                continue
            argv = argv_for(c.text, work, hf_tiny_dir)
            if argv[3:4] == ["serve"]:
                server = start_server(argv, work)
                if not any(d.text.startswith("curl ") for d in block):
                    probe(server[1] + "/v1/models")
                continue
            stdin = "/exit\n" if argv[3:4] == ["chat"] else ""
            check_command(c, run_pipe(argv, work, stdin), work)
    finally:
        if server:
            stop_server(server[0])


def test_demo_next_lines_run_as_printed(workspace, hf_tiny_dir):
    work, demo = workspace
    commands = demo_next_commands(demo.output)
    assert {shlex.split(c)[1] for c in commands} >= {"eval", "chat"}, commands
    for text in commands:
        argv = argv_for(text, work, hf_tiny_dir)
        stdin = "/exit\n" if argv[3:4] == ["chat"] else ""
        check_command(Command(text, "demo output", 0), run_pipe(argv, work, stdin), work)


def check_demo(result: Result) -> None:
    for expected in ("held-out exact match before training", "held-out exact match after", "run folder: runs/demo"):
        assert expected in result.output, str(result)


def check_command(c: Command, result: Result, cwd: Path) -> None:
    """Exit 0 and what the command exists to produce."""
    words = shlex.split(c.text)
    context = f"{c.where}: {c.text}\n{result}"
    if words[0] == "python":
        assert result.code == 0, context
        return
    sub = words[1]
    assert result.code == 0 and "Traceback" not in result.output, context
    out = result.output
    if sub == "train":
        check_train(result, cwd)
    elif sub == "eval":  # every held-out record answered and scored
        wrote = re.search(r"wrote (\S+)report\.md", out)
        assert wrote and "exact match" in out.lower(), context
        report = json.loads((cwd / wrote.group(1) / "report.json").read_text())
        assert report["generation"]["n"] == count_records(cwd / words[3]) and report["loss"], context
    elif sub == "chat":
        assert out.startswith("chat with ") and "you> /exit" in out, context
    elif sub == "generate":
        prompt = words[words.index("--prompt") + 1]
        assert prompt in out, context
    elif sub == "stats":
        folder = cwd / words[words.index("--out") + 1]
        assert any(folder.iterdir()), context
    elif sub == "score":
        target = cwd / words[words.index("--out") + 1]
        assert count_records(target) == count_records(cwd / words[3]) and "scored" in out, context
    elif sub == "check":
        assert "PASS" in out and "FAIL" not in out, context
    elif sub == "plan":
        assert "GB" in out, context
    elif sub == "info":
        assert "parameters" in out and "total" in out, context


def count_records(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


# --- qatune serve: started, probed once, stopped -------------------------------------------------


def start_server(argv: list[str], cwd: Path):
    """`--port 0`: the documented port 8000 may be taken; the server prints the one it got."""
    process = subprocess.Popen(
        [*argv, "--port", "0"],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r" on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return process, found.group(1)
    process.kill()
    raise AssertionError(f"qatune serve did not start:\n{''.join(lines)}")


def stop_server(process) -> None:
    process.send_signal(signal.SIGINT)  # Ctrl-C, as the server's banner says
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0 and "server stopped" in out, out


def probe(url: str, data: bytes | None = None, headers: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return json.loads(response.read())


def check_curl(text: str, server) -> None:
    """The README's curl request, sent to the running server (its port put in for 8000)."""
    words = shlex.split(text)
    url = next(w for w in words if w.startswith("http"))
    url = re.sub(r"^http://127\.0\.0\.1:8000", server[1], url)
    headers = dict(w.split(": ", 1) for w in (words[i + 1] for i, w in enumerate(words) if w == "-H"))
    data = next(words[i + 1] for i, w in enumerate(words) if w == "-d")
    reply = probe(url, data.encode(), headers)
    assert isinstance(reply["choices"][0]["message"]["content"], str), reply


def test_train_overrides_are_only_sizes_and_offline(workspace):
    work, _ = workspace
    got = train_overrides(shlex.split("qatune train configs/gpt2-large-sft.yaml name=x"), work)
    assert got == [*TINY_MODEL, "data.sources=[my_data.jsonl]", *SMALL_RUN]
    got = train_overrides(shlex.split("qatune train configs/gpt2-dpo.yaml model.name=runs/gpt2-alpaca/export"), work)
    assert got == SMALL_RUN
