"""The bridge between the HTTP server's event loop and the batcher's thread.

The batcher runs on a thread of its own: PyTorch releases the GIL inside its kernels, so the event
loop keeps accepting requests and writing streams while a decode step runs. Outputs come back to
the loop with `call_soon_threadsafe`, into one asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import replace

from qatune.generation.continuous import ContinuousBatcher, Output, Sequence
from qatune.generation.sampling import SamplingConfig


class Job:
    """The sequences of one request (n choices of each prompt) and the queue of their outputs."""

    def __init__(self, engine: AsyncEngine, prompts: list[list[int]], sampling: SamplingConfig, n: int, stops):
        self.engine = engine
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.sequences = []
        for i in range(len(prompts) * n):
            # choice i samples with seed + i: n choices of one seeded request differ, and repeat
            cfg = replace(sampling, seed=None if sampling.seed is None else sampling.seed + i)
            self.sequences.append(Sequence(prompts[i // n], cfg, self._emitter(loop, i), stops))
        self.finished = 0

    def _emitter(self, loop: asyncio.AbstractEventLoop, index: int):
        def emit(out: Output) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        return emit

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        """(choice index, output) until every sequence has finished."""
        while self.finished < len(self.sequences):
            index, out = await self.queue.get()
            if out.finish_reason is not None:
                self.finished += 1
            yield index, out

    def cancel(self) -> None:
        for seq in self.sequences:
            self.engine.batcher.cancel(seq)
        self.engine.batcher.wake()


class AsyncEngine:
    def __init__(self, batcher: ContinuousBatcher) -> None:
        self.batcher = batcher
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.batcher.serve_forever, args=(self._stop,), name="qatune-batcher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.batcher.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, prompts: list[list[int]], sampling: SamplingConfig, n: int, stops: tuple[str, ...]) -> Job:
        """Queue a request's sequences; raises QueueFull when the waiting line is full."""
        job = Job(self, prompts, sampling, n, stops)
        self.batcher.submit(job.sequences)
        return job
