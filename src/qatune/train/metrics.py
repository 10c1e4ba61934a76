"""Per-step metrics: `metrics.jsonl` (one JSON object per line) and TensorBoard events.

Lines are appended and flushed one whole line at a time while training. On `--resume` the file
is rewritten atomically with only the lines up to the checkpoint's step, so the steps a killed
run did after its last checkpoint are not counted twice (TensorBoard is told the same through
`purge_step`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qatune.utils.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    """All complete records; a torn last line (the process was killed mid-write) is skipped."""
    f = Path(run_dir) / METRICS_FILE
    if not f.exists():
        return []
    records = []
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _clean(record: dict) -> dict:
    # JSON has no NaN/inf: write them as null so every line stays standard JSON.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None:
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the run)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict, prefix: str = "train") -> None:
        record = _clean(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    group = "eval" if key.startswith("eval_") else prefix
                    self._tb.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, step)
                elif isinstance(value, bool):
                    self._tb.add_scalar(f"{prefix}/{key}", int(value), step)
                elif isinstance(value, dict):  # e.g. grad_norm_layers: one scalar per layer
                    for sub, v in value.items():
                        if isinstance(v, (int, float)) and v is not None:
                            self._tb.add_scalar(f"{key}/{sub}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
