"""The demo's settings, as data. Torch-free: `qatune demo --help` shows these defaults, and
`qatune.demo.run` (which needs torch) runs the demo."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoSettings:
    out_dir: str = "runs"
    name: str = "demo"
    steps: int = 300
    n_layer: int = 2
    n_embd: int = 128
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    tokenizer: str | None = None  # a folder, or "builtin" to train a BPE here; default: GPT-2's if found
    show: int = 5  # held-out questions answered at the end
    # One thread: this model's matmuls are too small to gain from more, and a multi-threaded run
    # slows down badly when other processes share the cores (measured: 22 s vs 52 s for 200 steps
    # with 1 vs 2 threads on a busy 2-core machine).
    threads: int | None = 1


QUICK = {"steps": 200, "name": "demo-quick"}
