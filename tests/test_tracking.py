"""Experiment trackers, offline: MLflow (a local file store) and W&B (WANDB_MODE=offline) get the
same scalars as metrics.jsonl, the resolved config as parameters and the plots as artifacts; a run
stopped and resumed goes on in the same tracker runs; bad settings are clear errors. (Only rank 0
logs: tests/test_distributed.py checks that its 2-rank DDP run made one MLflow run.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from tests.test_train_step import SMALL, examples_of_varied_lengths

from qatune.config import ConfigError, load_config
from qatune.launch import fit
from qatune.methods.config import TrainConfig
from qatune.model.gpt2 import GPT2
from qatune.train.metrics import read_metrics
from qatune.train.tracking import scalars


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def train(out: Path, on_step=None, resume: bool = False):
    torch.manual_seed(0)
    cfg = TrainConfig(name="tracked", out_dir=str(out), max_steps=4, save_every=2, export=False, threads=1)
    cfg.tracking = ["tensorboard", "mlflow", "wandb"]
    cfg.batch.size, cfg.batch.unit = 2, "examples"
    cfg.monitor.every, cfg.eval.every, cfg.optim.warmup_steps = 2, 2, 0
    data, held_out = examples_of_varied_lengths(12), examples_of_varied_lengths(4, seed=1)
    return fit(GPT2(SMALL), None, data, cfg, progress=False, on_step=on_step, resume=resume, eval_examples=held_out)


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient((out / "mlruns").as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "qatune"]
    [run] = client.search_runs([experiment.experiment_id])
    return client, run


def wandb_records(path: Path):
    """The records of a W&B transaction log (`run-<id>.wandb`): a header, then LevelDB-log
    records (7-byte header: crc, length, type; 32 KiB blocks) holding `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a run file once its `exit` record is there: `run.finish()` returns before
    W&B's service process has written the file out (seen under load: a run's last step missing)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(wandb_records(path)) if path.exists() else []
        except Exception:  # a record still being written
            records = []
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_run(run_dir: Path, run_id: str) -> dict:
    """History by step, config and artifacts of every offline run file of `run_id`: one folder
    per part of a resumed run (`wandb.init` creates it), `offline-run-<time>-<id>`, with `-1`,
    `-2`… appended when two parts start in the same second."""
    history, config, artifacts = {}, {}, []
    for folder in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*")):
        for r in finished_records(folder / f"run-{run_id}.wandb"):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.setdefault(r.history.step.num, {}).update(items)
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "artifact":
                artifacts.append((r.artifact.type, sorted(m.path for m in r.artifact.manifest.contents)))
    return {"history": history, "config": config, "artifacts": artifacts}


def test_mlflow_and_wandb_get_the_metrics_the_config_and_the_plots(tmp_path, offline):
    result = train(tmp_path)
    run_dir = result.run_dir
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "grad_norm_layers" in records[1]
    assert "eval_loss" in records[1] and records[0]["clipped"] in (True, False)
    ids = json.loads((run_dir / "tracking.json").read_text())
    plots = sorted(p.name for p in (run_dir / "plots").iterdir())
    assert "loss.png" in plots

    client, run = mlflow_run(tmp_path)  # the store beside the runs: <out_dir>/mlruns
    assert run.info.run_id == ids["mlflow"] and run.info.run_name == "tracked" and run.info.status == "FINISHED"
    expected = {}  # name -> [(step, value)] from metrics.jsonl
    for r in records:
        for name, value in scalars(r).items():
            expected.setdefault(name, []).append((r["step"], float(value)))
    assert {"loss", "eval_loss", "clipped", "grad_norm_layers/h.0", "tokens_per_s"} <= expected.keys()
    assert set(run.data.metrics) == set(expected)
    for name, values in expected.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)] == values, name
    params = run.data.params
    assert params["optim.lr"] == str(TrainConfig().optim.lr) and params["max_steps"] == "4"
    assert params["batch.size"] == "2" and json.loads(params["tracking"]) == ["tensorboard", "mlflow", "wandb"]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "plots")) == [f"plots/{p}" for p in plots]

    logged = wandb_run(run_dir, ids["wandb"])
    for r in records:
        step = logged["history"][r["step"]]
        assert {k: step[k] for k in scalars(r)} == pytest.approx(scalars(r), rel=1e-12, abs=0), r["step"]
    assert logged["config"]["optim"]["lr"] == TrainConfig().optim.lr and logged["config"]["name"] == "tracked"
    assert logged["artifacts"] == [("plots", plots)]
    assert any((run_dir / "tensorboard").iterdir())


def test_a_resumed_run_goes_on_in_the_same_tracker_runs(tmp_path, offline):
    def crash(record):
        if record["step"] == 3:  # after the step-2 checkpoint, before the step-4 one
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(tmp_path, on_step=crash)
    run_dir = tmp_path / "tracked"
    ids = json.loads((run_dir / "tracking.json").read_text())
    train(tmp_path, resume=True)
    assert json.loads((run_dir / "tracking.json").read_text()) == ids

    client, run = mlflow_run(tmp_path)  # still one run, finished, with every step
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [1, 2, 3, 3, 4]  # step 3 was done twice: before the crash and after the resume
    logged = wandb_run(run_dir, ids["wandb"])  # the same W&B run id, both parts
    assert sorted(logged["history"]) == [1, 2, 3, 4]
    final = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    assert logged["history"][4]["loss"] == final[4]


def test_tracking_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="'neptune' is not one of 'tensorboard', 'mlflow', 'wandb'"):
        load_config(TrainConfig, None, ["tracking=[tensorboard, neptune]"])
    with pytest.raises(ValueError, match="names a tracker twice"):
        load_config(TrainConfig, None, ["tracking=[mlflow, mlflow]"])
    assert load_config(TrainConfig, None, []).trackers == ["tensorboard"]
    assert load_config(TrainConfig, None, ["tracking=[wandb, tensorboard]", "tensorboard=false"]).trackers == ["wandb"]
