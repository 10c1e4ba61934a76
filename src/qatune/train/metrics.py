"""Per-step metrics: `metrics.jsonl` (one JSON object per line), and the same records to the
experiment trackers the config names (TensorBoard by default; MLflow, W&B: `train/tracking.py`).

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
    def __init__(
        self,
        run_dir: Path,
        resume_step: int | None = None,
        tracking: list[str] | tuple[str, ...] = ("tensorboard",),
        config: dict | None = None,
    ) -> None:
        """`tracking`: tracker names (see `qatune.train.tracking`); `config`: the resolved config,
        which MLflow and W&B record as the run's parameters."""
        from qatune.train.tracking import make_trackers

        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the run)
        self._trackers = make_trackers(list(tracking), self.run_dir, resume_step, config)

    def log(self, record: dict, prefix: str = "train") -> None:
        record = _clean(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for tracker in self._trackers:
            tracker.log(record, prefix)

    def close(self) -> None:
        """Close the file and the trackers; MLflow and W&B take the plots folder as artifacts (so
        the runtime closes the logger after writing the final plots)."""
        self._file.close()
        for tracker in self._trackers:
            tracker.close(self.run_dir / "plots")
