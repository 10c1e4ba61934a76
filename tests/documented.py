"""What the documentation tells a user to type, and how tests/test_documented_path.py runs it.

The commands come from README.md (its ```bash blocks and the `$ qatune …` lines of its other code
blocks) and from the demo's "next:" line, read at test time, so a newly documented command is run
as soon as it is documented. A command runs as printed (`qatune` as `python -m qatune`, the same
entry point from this checkout; `python` as this interpreter), in a folder laid out like the
repository root, with the progress display on, except for the substitutions below, each of which
is a size or an offline switch: a command that is neither runnable this way nor in SKIPPED fails
the test.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Commands the test does not run, with the reason. Matched on the command's first words.
SKIPPED = {
    "pip install": "installs packages: .ci/run does exactly this in a fresh venv before the suite runs",
    "python -m pytest": "the test suite itself (this file is part of it)",
    "torchrun --nproc_per_node 8": (
        "8 processes; tests/test_distributed.py runs the same `torchrun … -m qatune train … strategy=fsdp` "
        "on 2 CPU processes"
    ),
}

# Sizes: every training run gets a 2-layer d=64 random GPT-2 when its model is a hub name (a local
# export, like an SFT run's, is used as is), 2 optimizer steps and a few records; RL rollouts of
# 2 prompts and 8 new tokens. Nothing else of the config changes.
TINY_MODEL = ["model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=4"]
SMALL_DATA = ["data.limit=24"]
SMALL_RUN = ["max_steps=2", *SMALL_DATA]
# What each method's progress line must show on its last step (the step line and the held-out part).
PROGRESS_SHOWN = {
    "sft": ("loss ", "tok/s", "eval ", "ppl "),
    "dpo": ("loss ", "acc ", "margin ", "eval acc "),
    "reward": ("loss ", "acc ", "margin ", "eval acc "),
    "ppo": ("loss ", "reward ", "KL ", "eval reward "),
    "grpo": ("loss ", "reward ", "KL ", "eval reward "),
}
SMALL_RL = ["rl.prompts_per_rollout=2", "rl.rollout.max_new_tokens=8"]
# Offline: a hub data set is replaced by the README's own example file (the workspace writes
# my_data.jsonl), and a hub model that a command loads weights of by a tiny GPT-2 folder that
# transformers itself wrote.
LOCAL_DATA = "my_data.jsonl"
HUB_MODELS = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
LOADS_WEIGHTS = {"eval", "generate", "chat", "serve", "score", "export", "grads"}
# The demo as the README prints it trains 300 steps; the test trains 20 (same task, same run folder).
DEMO_STEPS = ["--steps", "20"]
# The SFT runs the README's DPO and GRPO examples start from ("from your SFT export"): the first is
# trained from the shipped configs/gpt2-sft.yaml (whose run name it is; tiny), the second is a copy.
SFT_RUN = ("runs/gpt2-alpaca", "qatune train configs/gpt2-sft.yaml")
SFT_COPIES = ["runs/gpt2-gsm8k"]


@dataclass
class Command:
    text: str  # as documented
    where: str  # README.md:LINE, or "demo output"
    block: int  # the code block it is in (commands of one block run in order)


def readme_commands(text: str) -> list[Command]:
    """Every command of the README's ```bash blocks (continuation lines joined, comments dropped,
    `a && b` split) and every `$ qatune …` line of its other code blocks, in order."""
    commands: list[Command] = []
    lines = text.splitlines()
    i, block = 0, 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            i += 1
            continue
        block += 1
        lang = fence[3:].strip()
        i += 1
        body: list[tuple[int, str]] = []
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        if lang == "bash":
            commands += [Command(c, f"README.md:{n}", block) for n, c in bash_commands(body)]
        else:
            commands += [
                Command(line.strip()[2:], f"README.md:{n}", block)
                for n, line in body
                if line.strip().startswith("$ qatune ")
            ]
    return commands


def bash_commands(body: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out, pending, first = [], "", 0
    for n, line in body:
        if not pending:
            first = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        for part in " ".join(shlex.quote(w) if w != "&&" else w for w in words).split(" && "):
            if part.strip():
                out.append((first, part.strip()))
    return out


def demo_next_commands(output: str) -> list[str]:
    """The commands of the demo's "next:" line (`next: A   |   B`)."""
    lines = [line for line in output.splitlines() if line.startswith("next: ")]
    assert len(lines) == 1, f"the demo printed {len(lines)} 'next:' lines:\n{output}"
    return [c.strip() for c in lines[0][len("next: ") :].split("   |   ")]


def skip_reason(command: str) -> str | None:
    for prefix, reason in SKIPPED.items():
        if command.startswith(prefix):
            return reason
    return None


# --- running a command ------------------------------------------------------------------------


@dataclass
class Result:
    argv: list[str]
    code: int
    output: str  # stdout and stderr together

    def __str__(self) -> str:
        return f"$ {shlex.join(self.argv)}\nexit {self.code}\n{self.output}"


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH")])
    )
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_pipe(argv: list[str], cwd: Path, stdin: str = "", timeout: float = 240) -> Result:
    """stdin, stdout and stderr are pipes, as in `qatune … | tee log` or CI."""
    p = subprocess.run(
        argv,
        cwd=cwd,
        env=environment(),
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return Result(argv, p.returncode, p.stdout)


def run_tty(argv: list[str], cwd: Path, timeout: float = 240) -> Result:
    """stdout and stderr on a pseudo-terminal (rich draws its live bar there); stdin is empty."""
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    p = subprocess.Popen(argv, cwd=cwd, env=environment(), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                p.kill()
                raise subprocess.TimeoutExpired(argv, timeout)
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed its side of the terminal
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif p.poll() is not None and not select.select([master], [], [], 0.1)[0]:
                break
        code = p.wait(timeout=30)
    finally:
        os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return Result(argv, code, ANSI.sub("", text))


# --- the workspace: a folder laid out like the repository root ---------------------------------


def make_workspace(base: Path, shared: Path, repo: Path) -> Path:
    """base/work is the current directory of every command: configs/ is the repository's, ../shared
    is the shared folder (the configs name ../shared/...), and the README's example files exist:
    my_data.jsonl (Alpaca layout), my_heldout.jsonl and answers.jsonl (question/answer), written
    from the demo's facts task."""
    from qatune.demo.task import make_task

    work = base / "work"
    work.mkdir(parents=True)
    (base / "shared").symlink_to(shared, target_is_directory=True)
    (work / "configs").symlink_to(repo / "configs", target_is_directory=True)
    train, test = make_task(0)
    write_jsonl(work / "my_data.jsonl", [{"instruction": q.question, "input": "", "output": q.answer} for q in train])
    write_jsonl(work / "my_heldout.jsonl", [{"question": q.question, "answer": q.answer} for q in test[:8]])
    write_jsonl(work / "answers.jsonl", [{"question": q.question, "answer": q.answer} for q in test[8:16]])
    return work


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def train_overrides(words: list[str], cwd: Path) -> list[str]:
    """The size and offline overrides for `qatune train|check CONFIG key=value…`, from the config
    the command resolves (its YAML plus the command's own overrides)."""
    from qatune.config import load_config
    from qatune.methods.config import TrainConfig

    i = words.index("train") if "train" in words else words.index("check")
    config, overrides = words[i + 1], [w for w in words[i + 2 :] if "=" in w and not w.startswith("-")]
    cfg = load_config(TrainConfig, cwd / config, overrides)
    extra = []
    if not (cwd / cfg.model.name).exists():
        extra += TINY_MODEL
    if any(s.startswith("hf:") for s in cfg.data.sources):
        extra.append(f"data.sources=[{LOCAL_DATA}]")
    if words[i] == "train":
        extra += SMALL_RUN + (SMALL_RL if cfg.method in ("ppo", "grpo") else [])
    else:
        extra += SMALL_DATA
    return extra


def argv_for(command: str, cwd: Path, tiny_model: Path) -> list[str]:
    """The argv the test runs for a documented command (the substitutions above, nothing else)."""
    words = shlex.split(command)
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    assert words[0] == "qatune", f"not a qatune command: {command}"
    sub = words[1]
    if sub in ("train", "check"):  # after the config: argparse takes no key=value after an option
        words = [*words[:3], *train_overrides(words, cwd), *words[3:]]
    elif sub == "demo":
        words = words + DEMO_STEPS
    elif sub in LOADS_WEIGHTS:
        words = [str(tiny_model) if w in HUB_MODELS and not (cwd / w).exists() else w for w in words]
    return [sys.executable, "-m", "qatune", *words[1:]]
