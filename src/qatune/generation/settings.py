"""How to sample, as data. Torch-free: the CLI's `--temperature`/`--top-p` … defaults read it while
building `--help`, and `qatune.generation.sampling` (which needs torch) does the sampling."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop_at_eos: bool = True
