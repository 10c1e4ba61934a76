"""The progress display of a training run: a rich bar on a terminal, plain lines otherwise.

What a step shows is what its method declares (`Method.progress_fields`): only the declared keys
present in the record, each formatted as declared, so a method's new metric cannot break it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from qatune.train.method import Method

PLAIN_EVERY_S = 10  # seconds between plain lines (eval steps and the last step always print)


def step_info(record: dict, fields: Sequence[tuple[str, str]]) -> str:
    """The declared fields of `record` that it holds as numbers, formatted, two spaces apart."""
    parts = []
    for key, text in fields:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(text.format(value))
    return "  ".join(parts)


class Progress:
    """A rich progress bar with the method's fields; plain lines when stderr is not a terminal."""

    def __init__(
        self, total: int, start: int, enabled: bool, fields: Sequence[tuple[str, str]] = Method.progress_fields
    ) -> None:
        self.total, self.enabled, self.fields, self._bar = total, enabled, tuple(fields), None
        self._last_line = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),  # where the check above looked (stdout may be a pipe or file)
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, r: dict) -> None:
        if not self.enabled:
            return
        info = step_info(r, self.fields)
        if self._bar is not None:
            self._bar.update(self._task, completed=r["step"], info=info)
        elif any(k.startswith("eval_") for k in r) or r["step"] == self.total or self._due():
            self._last_line = time.perf_counter()
            print(f"step {r['step']}/{self.total}  {info}", file=sys.stderr, flush=True)

    def _due(self) -> bool:
        return time.perf_counter() - self._last_line > PLAIN_EVERY_S

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
