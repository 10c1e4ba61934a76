"""`qatune --help` and every `qatune CMD --help` answer without importing torch or transformers
(importing torch alone takes over a second)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from qatune.cli import COMMANDS

HEAVY = ("torch", "transformers", "safetensors", "tokenizers", "datasets", "matplotlib")

# Every --help, in one fresh interpreter, then the heavy modules it loaded.
PROBE = """
import contextlib, io, json, sys
from qatune.cli import COMMANDS, main
shown = {}
for argv in [["--help"]] + [[c, "--help"] for c in COMMANDS]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    shown[" ".join(argv)] = out.getvalue()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps({"heavy": heavy, "shown": shown}))
"""


def run_python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120, check=True)


def test_every_help_leaves_torch_and_transformers_unimported():
    result = json.loads(run_python("-c", PROBE % (HEAVY,)).stdout)
    assert result["heavy"] == []
    assert set(result["shown"]) == {"--help", *(f"{c} --help" for c in COMMANDS)}
    for argv, text in result["shown"].items():
        assert text.startswith("usage: qatune"), argv
    assert "--max-new-tokens MAX_NEW_TOKENS" in result["shown"]["generate --help"]
    assert "{fp32,bf16,fp16,bf16-master,fp16-master}" in result["shown"]["plan --help"]


def test_help_is_quick():
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run_python("-m", "qatune", "--help")
        times.append(time.perf_counter() - start)
    print(f"qatune --help: best of 3 {min(times):.3f} s (all: {', '.join(f'{t:.3f}' for t in times)})")
    # Generous: a shared machine; importing torch alone took 1.5 s on the machine that found this.
    assert min(times) < 1.0
