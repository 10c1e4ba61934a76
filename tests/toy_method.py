"""A second training method for the runtime's tests: language modelling of the PROMPT tokens only,
the mirror image of SFT. It brings its own batches (prompt-token targets, counted when collated)
and its own step; the runtime runs it with no change — training, resume, DDP.

Registered under the name `prompt_lm` by `register()` (tests call it; subprocesses run it first).
"""

from __future__ import annotations

import dataclasses

from qatune.data.batching import Batch, model_inputs
from qatune.data.example import IGNORE
from qatune.kernels.loss import response_loss_sum
from qatune.methods import METHODS
from qatune.methods.sft import SFT
from qatune.methods.sft.monitor import prompt_targets
from qatune.train.method import StepOutput
from qatune.train.step import lm_weight

NAME = "prompt_lm"


def register() -> None:
    METHODS[NAME] = "tests.toy_method:PromptLM"


def prompt_batch(batch: Batch) -> Batch:
    """The same rows, with the prompt tokens as targets (and their count as the normalizer)."""
    targets = prompt_targets(batch)
    return dataclasses.replace(batch, targets=targets, n_label_tokens=int((targets != IGNORE).sum()))


class PromptLM(SFT):
    name = NAME

    def setup(self, run) -> None:
        super().setup(run)
        self.held_out = [prompt_batch(b) for b in self.held_out]

    def plan(self, run):
        plan = super().plan(run)
        collate = plan.make_batch
        plan.make_batch = lambda items: prompt_batch(collate(items))
        return plan

    def step(self, model, batch: Batch, monitor: bool = False) -> StepOutput:
        hidden = model(**model_inputs(batch))
        loss_sum, _ = response_loss_sum(hidden, lm_weight(model), batch.targets, self.chunk_size)
        return StepOutput(loss_sum, batch.count)

    def summarize(self, totals: dict[str, float], count: int) -> dict:
        return {"prompt_tokens": count}
