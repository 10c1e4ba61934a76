"""`precision: auto` picks by measurement: bf16 where this machine's bf16 matmul is clearly faster
than fp32 (a short probe, cached per machine), fp32 elsewhere; the pick and the two rates are
printed when a run starts and saved in its folder, and a resumed run keeps the precision it
started with."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tests.processes import run_cli

import qatune.utils.precision_probe as probe
from qatune.runs import CHECKPOINTS_DIR
from qatune.train.metrics import read_metrics
from qatune.train.runtime import PRECISION_FILE, pick_precision
from qatune.utils.precision_probe import BF16_MIN_SPEEDUP, choose_precision

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
CPU = torch.device("cpu")


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cached_rates(cache: Path, fp32: float, bf16: float) -> None:
    """Overwrite every cached probe result under `cache` with these rates (FLOP/s)."""
    files = list((cache / "precision").glob("cpu-*.json"))
    assert files, "no cached probe"
    for f in files:
        saved = json.loads(f.read_text())
        f.write_text(json.dumps({"key": saved["key"], "rates": {"fp32": fp32, "bf16": bf16}}))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QATUNE_CACHE", str(tmp_path / "cache"))
    probe.cpu_choice.cache_clear()
    yield tmp_path / "cache"
    probe.cpu_choice.cache_clear()


def test_bf16_only_where_its_matmul_measured_at_least_twice_fp32(cache, monkeypatch):
    rates = {"fp32": 100e9, "bf16": 199e9}
    monkeypatch.setattr(probe, "measure_matmul_rates", lambda: dict(rates))
    first = choose_precision("auto", CPU)
    assert (first.precision, first.reason, first.rates) == ("fp32", "measured", rates)
    assert "fp32 100 GFLOP/s, bf16 199 GFLOP/s" in first.describe() and "bf16 is picked from 2x" in first.describe()
    probe.cpu_choice.cache_clear()  # a new process: the cached file answers, nothing is measured
    monkeypatch.setattr(probe, "measure_matmul_rates", lambda: pytest.fail("measured again"))
    cached_rates(cache, 100e9, BF16_MIN_SPEEDUP * 100e9)
    again = choose_precision("auto", CPU)
    assert (again.precision, again.reason) == ("bf16", "cached measurement")
    assert pick_precision("auto", CPU) == "bf16" and pick_precision("fp32", CPU) == "fp32"


def test_the_cache_is_per_instruction_set_and_the_probe_measures_one_core(cache, monkeypatch):
    plain = probe.machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = probe.machine_key()
    assert plain != capped and capped["env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"} and plain["torch"] == torch.__version__
    threads = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(probe, "_linear_rate", lambda x, w: seen.append((x.dtype, torch.get_num_threads())) or 1.0)
    probe.measure_matmul_rates()
    assert set(seen) == {(torch.float32, 1), (torch.bfloat16, 1)} and len(seen) == 2 * probe.PROBE_ROUNDS
    assert torch.get_num_threads() == threads  # the run's own setting is back


def test_a_resumed_auto_run_keeps_what_its_checkpoint_recorded(monkeypatch):
    monkeypatch.setattr(probe, "cpu_choice", lambda: pytest.fail("probed although the checkpoint says"))
    kept = choose_precision("auto", CPU, recorded="bf16")
    assert (kept.precision, kept.reason) == ("bf16", "recorded by the checkpoint")
    # Saved unresolved by an older version, whose auto meant fp32 on every CPU.
    assert choose_precision("auto", CPU, recorded="auto").precision == "fp32"
    assert choose_precision("fp32", CPU, recorded="bf16").precision == "fp32"  # an explicit value is the user's


def test_on_a_gpu_auto_is_bf16_where_supported(monkeypatch):
    cuda = torch.device("cuda")
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert choose_precision("auto", cuda).precision == expected


@pytest.mark.skipif("avx2" not in _cpu_flags(), reason="needs an x86 CPU with AVX2")
def test_the_real_probe_picks_fp32_where_bf16_is_emulated(tmp_path):
    """On this CPU with the kernels capped at AVX2 (no AVX512-BF16, no AMX) bf16 is emulated through
    fp32 and measures far slower: auto must pick fp32. Without the cap, the pick follows the rates."""
    code = (
        "import json, torch; from qatune.utils.precision_probe import choose_precision; "
        "c = choose_precision('auto', torch.device('cpu')); print(json.dumps(c.to_json()))"
    )
    picks = {}
    for name, extra in (("avx2", AVX2_ONLY), ("native", {})):
        env = {**os.environ, "QATUNE_CACHE": str(tmp_path / name), **extra}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        picks[name] = json.loads(out.stdout.splitlines()[-1])
    avx2, native = picks["avx2"], picks["native"]
    assert avx2["rates"]["bf16"] < avx2["rates"]["fp32"] and avx2["precision"] == "fp32"
    native_bf16 = native["rates"]["bf16"] >= BF16_MIN_SPEEDUP * native["rates"]["fp32"]
    assert native["precision"] == ("bf16" if native_bf16 else "fp32")


# --- through `qatune train` -------------------------------------------------------------------

CONFIG = """\
name: auto
out_dir: {out}
tokenizer: {tokenizer}
model: {{name: gpt2, init: random, n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}}
data: {{sources: [{data}], max_len: 64}}
batch: {{size: 8}}
max_steps: 3
save_every: 1
threads: 1
plots: false
tensorboard: false
"""


@pytest.fixture
def auto_config(tmp_path, tokenizer_dir, cache) -> Path:
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"What is {a} plus 3?", "answer": str(a + 3)}) + "\n" for a in range(30))
    )
    cfg = tmp_path / "auto.yaml"  # precision left to its default: auto
    cfg.write_text(CONFIG.format(out=tmp_path / "runs", tokenizer=tokenizer_dir, data=data))
    return cfg


@pytest.mark.slow
def test_train_prints_and_records_the_measured_pick_and_reuses_the_cached_probe(auto_config, tmp_path, cache):
    first = run_cli("train", str(auto_config), "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "auto"
    recorded = json.loads((run / PRECISION_FILE).read_text())
    rates, picked = recorded["rates"], recorded["precision"]
    assert picked == ("bf16" if rates["bf16"] >= BF16_MIN_SPEEDUP * rates["fp32"] else "fp32")
    assert recorded["reason"] == "measured"
    line = f"precision auto -> {picked} (measured: one core's matmul fp32 {rates['fp32'] / 1e9:,.0f} GFLOP/s"
    assert line in first.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == picked

    # The next run on this machine reads the cached probe: the rates planted there decide.
    cached_rates(cache, fp32=100e9, bf16=900e9)
    again = run_cli("train", str(auto_config), "name=auto2", "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "precision auto -> bf16 (cached measurement: one core's matmul fp32 100 GFLOP/s, bf16 900" in again.stderr
    assert json.loads((tmp_path / "runs" / "auto2" / PRECISION_FILE).read_text())["rates"]["bf16"] == 900e9
    assert yaml.safe_load((tmp_path / "runs" / "auto2" / "config.yaml").read_text())["precision"] == "bf16"


@pytest.mark.slow
def test_an_auto_run_resumes_in_its_recorded_precision_when_the_probe_now_says_otherwise(auto_config, tmp_path, cache):
    first = run_cli("train", str(auto_config), "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "auto"
    picked = yaml.safe_load((run / "config.yaml").read_text())["precision"]
    written = (run / PRECISION_FILE).read_text()
    other = "fp32" if picked == "bf16" else "bf16"
    cached_rates(cache, fp32=100e9, bf16=900e9 if other == "bf16" else 10e9)  # this machine now "prefers" the other
    shutil.rmtree(run / CHECKPOINTS_DIR / "step_00000003")
    again = run_cli("train", str(auto_config), "--resume", "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"precision auto -> {picked} (recorded by the checkpoint)" in again.stderr
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == picked
    assert (run / PRECISION_FILE).read_text() == written  # the start's measurement stays
    fresh = run_cli("train", str(auto_config), "name=fresh", "--no-progress")  # a new run follows the probe
    assert fresh.returncode == 0 and f"precision auto -> {other} (cached measurement" in fresh.stderr
