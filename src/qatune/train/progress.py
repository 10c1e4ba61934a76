"""The progress display of a training run: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """A rich progress bar with loss, lr and tokens/s; plain lines when stderr is not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.enabled, self._bar = total, enabled, None
        self._last_line = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, r: dict) -> None:
        if not self.enabled:
            return
        info = f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:,.0f} tok/s"
        if "kl" in r:  # an RL step that sampled a rollout
            info += f"  reward {r['reward']:.3f}  KL {r['kl']:.3f}"
        if "eval_loss" in r:
            info += f"  eval {r['eval_loss']:.4f}"
        if "eval_reward" in r:
            info += f"  eval reward {r['eval_reward']:.3f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=r["step"], info=info)
        elif "eval_loss" in r or "eval_reward" in r or r["step"] == self.total or self._due():
            self._last_line = time.perf_counter()
            print(f"step {r['step']}/{self.total}  {info}", file=sys.stderr, flush=True)

    def _due(self) -> bool:
        return time.perf_counter() - self._last_line > 10

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
