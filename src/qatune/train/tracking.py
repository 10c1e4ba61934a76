"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, chosen by the config's `tracking`.

Each tracker gets what `metrics.jsonl` gets — every logged record, at its step — plus, for MLflow
and W&B, the resolved config as parameters at the start and the plots folder as artifacts at the
end. Records are flattened the same way for both: `loss`, `eval_loss`, a per-layer dict as
`grad_norm_layers/h.0`; booleans become 0/1; a NaN (logged as null in the JSON) is left out.

Only the main process (rank 0) logs: the runtime creates the metrics logger there alone.

- MLflow (`pip install 'qatune[mlflow]'`, the mlflow-skinny client): `$MLFLOW_TRACKING_URI` when
  set (a tracking server), else a local store in `<out_dir>/mlruns` shared by the runs of that
  folder; experiment `$MLFLOW_EXPERIMENT_NAME`, else "qatune"; the run is named after the config.
- W&B (`pip install 'qatune[wandb]'`): its own login and settings (`WANDB_PROJECT`, else
  "qatune"; `WANDB_MODE=offline` needs no network); its files go under `<run>/wandb`.

A resumed run continues the same MLflow / W&B run: their ids are kept in `<run>/tracking.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qatune.errors import UserError
from qatune.utils.files import write_text_atomic

TRACKERS = ("tensorboard", "mlflow", "wandb")
STATE_FILE = "tracking.json"  # the MLflow / W&B run ids, so that --resume continues the same runs


def scalars(record: dict) -> dict[str, float]:
    """A metrics record as flat name -> number (the step itself excluded)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{sub}": v for sub, v in value.items() if _number(v)})
        elif isinstance(value, bool):
            out[key] = int(value)
        elif _number(value):
            out[key] = value
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # v == v: not NaN


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": "0.001"}: the resolved config as parameters."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


class TrackerState:
    """`<run>/tracking.json`: the ids of the MLflow / W&B runs this run folder logs to."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.path = Path(run_dir) / STATE_FILE
        self.ids = json.loads(self.path.read_text(encoding="utf-8")) if resume and self.path.exists() else {}

    def get(self, tracker: str) -> str | None:
        return self.ids.get(tracker)

    def set(self, tracker: str, run_id: str) -> None:
        self.ids[tracker] = run_id
        write_text_atomic(self.path, json.dumps(self.ids, indent=2) + "\n")


class TensorBoard:
    """Scalars grouped as train/*, eval/* (eval_ prefix dropped) and one group per nested dict."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict, prefix: str) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                group = "eval" if key.startswith("eval_") else prefix
                self.writer.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, step)
            elif isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", int(value), step)
            elif isinstance(value, dict):  # e.g. grad_norm_layers: one scalar per layer
                for sub, v in value.items():
                    if isinstance(v, (int, float)) and v is not None:
                        self.writer.add_scalar(f"{key}/{sub}", v, step)

    def close(self, plots: Path) -> None:
        self.writer.close()  # TensorBoard draws its own plots


class MLflow:
    def __init__(self, run_dir: Path, config: dict, state: TrackerState) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps its file store only on request; it is the store that needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(run_dir).resolve().parent / "mlruns").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.run_id = state.get("mlflow")
        if self.run_id is not None:  # a resumed run: the same MLflow run goes on
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "qatune")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=config.get("name")).info.run_id
        state.set("mlflow", self.run_id)
        self._log_params(flat_config(config))

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        items = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 parameters
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, record: dict, prefix: str) -> None:
        import time

        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), record["step"]
        metrics = [Metric(k, float(v), now, step) for k, v in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, plots: Path) -> None:
        if plots.is_dir() and any(plots.iterdir()):
            self.client.log_artifacts(self.run_id, str(plots), "plots")
        self.client.set_terminated(self.run_id)


class WandB:
    def __init__(self, run_dir: Path, config: dict, state: TrackerState) -> None:
        import wandb

        self.wandb = wandb
        run_id = state.get("wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "qatune"),
            name=config.get("name"),
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        if run_id is None:
            state.set("wandb", self.run.id)

    def log(self, record: dict, prefix: str) -> None:
        # commit=True writes the step's row now: with an explicit step W&B otherwise holds the row
        # open until a later step or finish(), which a killed process never reaches.
        self.run.log(scalars(record), step=record["step"], commit=True)

    def close(self, plots: Path) -> None:
        if plots.is_dir() and any(plots.iterdir()):
            artifact = self.wandb.Artifact(f"plots-{self.run.id}", type="plots")
            artifact.add_dir(str(plots))
            self.run.log_artifact(artifact)
        self.run.finish()


def make_trackers(names: list[str], run_dir: Path, resume_step: int | None, config: dict | None) -> list:
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"unknown tracker {unknown[0]!r}; known: {', '.join(TRACKERS)}")
    state = TrackerState(run_dir, resume=resume_step is not None)
    config = config or {}
    build = {
        "tensorboard": lambda: TensorBoard(run_dir, resume_step),
        "mlflow": lambda: MLflow(run_dir, config, state),
        "wandb": lambda: WandB(run_dir, config, state),
    }
    trackers = []
    for name in names:
        try:
            trackers.append(build[name]())
        except ImportError:
            if name == "tensorboard":  # a main dependency: a broken install, keep the traceback
                raise
            raise UserError(f"tracking: {name} needs its extra: pip install 'qatune[{name}]'") from None
    return trackers
