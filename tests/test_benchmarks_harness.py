"""The benchmarks' shared harness: every script imports as a module of the `benchmarks` package
(no sys.path edits), states the CPU it ran on, and ends with one JSON line."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from benchmarks import harness

SCRIPTS = sorted(p.stem for p in Path(harness.__file__).parent.glob("*.py") if p.stem not in ("__init__", "harness"))


def test_cpu_info_names_the_model_and_the_kernel_flags():
    info = harness.cpu_info()
    assert isinstance(info["model"], str) and info["model"]
    assert set(info["flags"]) == {"amx_bf16", "avx512_bf16", "avx2"}
    assert all(isinstance(v, bool) for v in info["flags"].values())


def test_emit_prints_the_cpu_then_one_json_line_last(capsys):
    harness.emit({"benchmark": "x", "results": {"a": 1}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU: ") and "avx2" in lines[0]
    record = json.loads(lines[-1])
    assert record["benchmark"] == "x" and record["cpu"] == harness.cpu_info()


def test_run_settings_are_fresh_dicts():
    a = harness.run_settings(1, save_every=5)
    a["eval"]["fraction"] = 0.5
    b = harness.run_settings()
    assert b["eval"] == {"fraction": 0.0} and "threads" not in b and a["save_every"] == 5


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports_as_a_module_and_uses_the_harness(name):
    source = (Path(harness.__file__).parent / f"{name}.py").read_text()
    assert "sys.path" not in source
    assert "from benchmarks import harness" in source or "from benchmarks.harness import" in source
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)
