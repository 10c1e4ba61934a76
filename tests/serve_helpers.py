"""A `qatune serve` app on 127.0.0.1 (a free port) in a thread of the test process, built by the
same code as the CLI, so tests can reach into its batcher."""

from __future__ import annotations

import socket
import threading
import time

import torch

from qatune.cli import build_parser
from qatune.cli.serve import build_server


class ServerThread:
    def __init__(self, run, *options: str, start_engine: bool = True) -> None:
        args = build_parser().parse_args(["serve", str(run), "--threads", "1", *options])
        self.app, self.engine, self.served = build_server(args)
        self.batcher = self.engine.batcher
        self.start_engine = start_engine

    def __enter__(self) -> ServerThread:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        if self.start_engine:
            self.engine.start()
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()
        self.sock.close()

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def one_thread():
    """One intra-op thread for the test process: tiny matmuls gain nothing from more, and lose a
    lot on a busy CPU. A generator for a module fixture; restores the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
