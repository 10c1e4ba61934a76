"""Every method through `qatune train` as a user types it: the method's defaults, only the keys it
cannot do without (its data), tiny size overrides, and the progress display on a pipe (plain
lines; the terminal, where rich draws its bar, is test_documented_path's). The run folder's
config.yaml records the settings the method resolved, and a resume from that file continues.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from tests.documented import PROGRESS_SHOWN as SHOWN
from tests.processes import run_cli

from qatune.runs import CHECKPOINTS_DIR
from qatune.train.metrics import read_metrics
from qatune.train.runtime import PRECISION_FILE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PICKED = "what precision.json says auto picked"
DATA = {"sft": "qa", "dpo": "pairs", "reward": "pairs", "ppo": "qa", "grpo": "qa"}
# Only what the method needs from the user (its data) and sizes that make it quick.
CONFIG = """\
method: {method}
out_dir: {out}
model: {{name: gpt2, init: random, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}}
data: {{sources: [{data}], max_len: 64}}
max_steps: 2
threads: 1
"""


def _write_data(root: Path) -> None:
    with (root / "qa.jsonl").open("w") as qa, (root / "pairs.jsonl").open("w") as pairs:
        for a in range(40):
            b = (a * 37) % 100
            qa.write(json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n")
            row = {"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}.", "rejected": f"It is {a + b + 7}."}
            pairs.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("defaults")
    _write_data(root)
    return root


def config_file(root: Path, method: str, mode: str) -> Path:
    path = root / f"{method}_{mode}.yaml"
    path.write_text(CONFIG.format(method=method, out=root / mode, data=root / f"{DATA[method]}.jsonl"))
    return path


@pytest.fixture(scope="module")
def pipe_run(root):
    """pipe_run(method): `qatune train CONFIG name=METHOD` with stderr a pipe, once per method;
    (the process, its run folder)."""

    @functools.cache
    def run(method: str) -> tuple[subprocess.CompletedProcess, Path]:
        return run_cli("train", str(config_file(root, method, "pipe")), f"name={method}"), root / "pipe" / method

    return run


@pytest.mark.parametrize("method", list(DATA))
def test_every_method_trains_from_its_defaults_with_progress_on_a_pipe(pipe_run, method):
    proc, run_dir = pipe_run(method)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.startswith("step 2/2")]
    assert last, proc.stderr[-3000:]
    for shown in SHOWN[method]:
        assert shown in last[-1], (shown, last[-1])
    assert read_metrics(run_dir)[-1]["step"] == 2
    assert (run_dir / "export" / "README.md").is_file()


@pytest.mark.parametrize(
    ("method", "resolved"),
    [
        ("dpo", {"data.truncation": "cut_pair", "precision": PICKED}),
        ("reward", {"data.truncation": "cut_pair"}),
        ("grpo", {"rl.group_size": 8, "precision": PICKED}),
        ("ppo", {"rl.group_size": 1}),
        ("sft", {"data.truncation": "cut_response", "precision": PICKED}),
    ],
)
def test_the_saved_config_records_what_the_method_resolved(pipe_run, method, resolved):
    """The run folder's config.yaml and the checkpoint's say what the run used: a preference
    method's pair policy (cut_response reads as cut_pair), GRPO's group size, the precision that
    `auto` picked on this CPU (fp32 or bf16 by the probe's rates, which precision.json records)."""
    proc, run_dir = pipe_run(method)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if resolved.get("precision") == PICKED:
        picked = json.loads((run_dir / PRECISION_FILE).read_text())["precision"]
        assert picked in ("fp32", "bf16") and f"precision auto -> {picked}" in proc.stderr
        resolved = resolved | {"precision": picked}
    checkpoint = sorted((run_dir / CHECKPOINTS_DIR).iterdir())[-1]
    for saved in (run_dir / "config.yaml", checkpoint / "config.yaml"):
        cfg = yaml.safe_load(saved.read_text())
        for key, value in resolved.items():
            section, _, leaf = key.rpartition(".")
            assert (cfg[section] if section else cfg)[leaf] == value, (saved, key)


def test_a_resume_from_the_saved_config_continues_the_run(root):
    """`qatune train <run>/config.yaml --resume` (resolved values and all) continues from the
    step-1 checkpoint; so does the user's own config against a checkpoint whose config.yaml holds
    the values unresolved, as runs saved them before."""
    user_config = config_file(root, "dpo", "pipe")
    first = run_cli("train", str(user_config), "name=dpo_resume", "save_every=1", "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = root / "pipe" / "dpo_resume"
    checkpoints = run_dir / CHECKPOINTS_DIR
    for saved_config, checkpoint in ((run_dir / "config.yaml", "step_00000001"), (user_config, "step_00000001")):
        shutil.rmtree(checkpoints / "step_00000002")
        again = run_cli("train", str(saved_config), "name=dpo_resume", "save_every=1", "--resume", "--no-progress")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "trained 2 steps" in again.stdout
        assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
        old = checkpoints / checkpoint / "config.yaml"
        unresolved = yaml.safe_load(old.read_text())
        unresolved["data"]["truncation"], unresolved["precision"] = "cut_response", "auto"
        old.write_text(yaml.safe_dump(unresolved, sort_keys=False))


def test_grpo_refuses_an_explicit_group_of_one(root):
    proc = run_cli("train", str(config_file(root, "grpo", "pipe")), "name=grpo_one", "rl.group_size=1", "--no-progress")
    assert proc.returncode != 0
    assert "rl.group_size >= 2" in proc.stderr
