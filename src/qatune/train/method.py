"""What a training method supplies to the runtime: its data, its plan of steps, and its step.

The runtime (`qatune.train.runtime`) owns everything a method has in common with every other —
devices, precision, wrapping, accumulation, clipping, checkpoints, logging, export. A method owns
what makes it that method:

    setup(run)                    load/split its data; `run` is the RunContext below
    wrap(model) -> module         the module trained (default: the GPT-2 itself)
    plan(run) -> StepPlan         every optimizer step of the run, as this rank's micro-batches
    step(model, batch, monitor)   forward + loss of one micro-batch -> StepOutput (no backward)
    summarize(totals, count)      the step's summed metrics -> fields of the metrics record
    progress_fields / summary_fields   which of those fields the progress line and the model card show
    resolve_config(cfg)           the config with the method's own defaults filled in (what the run records)
    evaluate(model)               held-out metrics (eval_*), called by the runtime at eval steps
    state_dict / load_state_dict  method state kept in checkpoints (rollout buffers, controllers)
    export(model, run, info, files)  the final export (default: a transformers GPT-2 LM folder)

and declares what it reads and what the runtime must refuse for it:

    from_config(settings, ...)    its data, loaded as the run's typed `RunSettings` say
    config_sections               its own config section (`run.section`), e.g. ("dpo",)
    fsdp_unsupported, accumulation_unsupported, fixed_world_size   checked by the runtime before setup
    pipeline_tag, title           what its export is, for the model card

A method never touches the wrappers (DDP, compile: `qatune.model.unwrap`), activation
checkpointing or torch.distributed: it asks the context (`run.barrier()`, `run.sum_over_ranks`).

The runtime divides every micro-batch's `loss_sum` by the count of the WHOLE optimizer step (all
micro-batches, all ranks), summed from the batches' `.count` before any forward pass, so that
micro-batch x accumulation x ranks gives exactly the large-batch gradient whatever the method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from qatune.data.pipeline import DataConfig
from qatune.data.plan import BatchConfig
from qatune.train.config import EvalConfig, ModelConfig
from qatune.train.distributed import barrier
from qatune.train.export import export_lm
from qatune.train.step import Precision, evaluate_sums, global_sum


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # scalar: the SUM of this micro-batch's per-unit losses (with grad when training)
    count: int  # units in loss_sum (label tokens, pairs …), known from the batch: no device sync
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)  # sums over the micro-batch


class BatchLike(Protocol):
    count: int  # the loss normalizer of this micro-batch
    n_tokens: int  # real tokens, for tokens/s
    n_examples: int

    def to(self, device) -> BatchLike: ...


class StepPlan(Protocol):
    """Every optimizer step of a run. `micro_batches` may be computed on demand (an online method
    generates its rollouts there); `prefetch` says whether the runtime may build the next step's
    batches in a background thread while the current step runs (only when they do not depend on
    the model being trained)."""

    prefetch: bool

    def __len__(self) -> int: ...

    def epoch_of(self, step: int) -> int: ...

    def micro_batches(self, step: int, rank: int, world_size: int) -> list[BatchLike]: ...


@dataclass(frozen=True)
class RunSettings:
    """The settings of the run that a method reads, typed: the config's shared sections. The
    runtime's own (devices, strategy, precision, checkpoints, logging) are not here: a method
    never needs them."""

    model: ModelConfig
    data: DataConfig
    batch: BatchConfig
    eval: EvalConfig
    seed: int  # the held-out split, the data order, sampling
    epochs: int
    max_steps: int | None
    loss_chunk: int  # label rows per LM-head chunk

    @classmethod
    def of(cls, cfg) -> RunSettings:
        """The shared settings of a whole `qatune train` config."""
        return cls(cfg.model, cfg.data, cfg.batch, cfg.eval, cfg.seed, cfg.epochs, cfg.max_steps, cfg.loss_chunk)


@dataclass
class RunContext:
    """What the runtime tells a method about the run it is part of: the shared settings, the
    method's own config section (the one its `config_sections` names), and the run's state."""

    settings: RunSettings
    section: Any  # the method's own config section (DPOConfig, RewardConfig, RLConfig), None for sft
    tokenizer: Any
    device: torch.device
    precision: Precision
    rank: int
    world_size: int  # ranks launched
    plan_world: int  # ranks the global batch was set for (differs when resumed on another number)
    run_dir: Path
    model: nn.Module | None = None  # the plain GPT-2 (unwrapped), once built
    reference: nn.Module | None = None  # frozen initial weights, for methods with `needs_reference`

    @classmethod
    def for_method(cls, cfg, method, *args, **kwargs) -> RunContext:
        """The context of a run of `method` with the whole config `cfg`: its settings and the
        method's section; `args` as the fields after `section`."""
        section = getattr(cfg, method.config_sections[0]) if method.config_sections else None
        return cls(RunSettings.of(cfg), section, *args, **kwargs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Every rank waits here until all have arrived (nothing in a single process): a method
        that writes a file on rank 0 for the others to read waits here, and never calls
        torch.distributed itself."""
        barrier()

    @staticmethod
    def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks, in place (as is in a single process): the one
        collective a method's own statistics need (a rollout's KL, whitening over all ranks)."""
        return global_sum(values)


# What every method's progress line starts with: (metric key, format text). The runtime writes
# these keys into every record.
STEP_FIELDS: tuple[tuple[str, str], ...] = (
    ("loss", "loss {:.4f}"),
    ("lr", "lr {:.2e}"),
    ("tokens_per_s", "{:,.0f} tok/s"),
)


class Method:
    """Defaults shared by every method; a method overrides what makes it different."""

    name = "method"
    title = ""  # what the method is, in a few words (the model card, docs/config.md)
    needs_reference = False  # the runtime keeps a frozen copy of the initial model (run.reference)
    # model.disable_dropout's default: the loss compares the training forward with an eval one
    train_without_dropout = False
    plots: dict = {}  # extra plots of this method's metrics: name -> ((metric keys), y label)
    # The progress line: (metric key, format text) in order; a key missing from a record (or not a
    # number) is left out, so a metric a method adds or drops never breaks the display.
    progress_fields: tuple[tuple[str, str], ...] = (*STEP_FIELDS, ("eval_loss", "eval {:.4f}"))
    # The final metrics the export's model card lists: (metric key, what it is).
    summary_fields: tuple[tuple[str, str], ...] = (("loss", "training loss (last step)"),)
    config_sections: tuple[str, ...] = ()  # the config sections that apply to this method only
    pipeline_tag = "text-generation"  # what the export is, as the model card tells the hub
    # What the runtime refuses for this method, and why (None: the method supports it). The
    # runtime checks these before `setup`, so a method never reads the strategy or the ranks.
    fsdp_unsupported: str | None = None  # strategy fsdp
    accumulation_unsupported: str | None = None  # batch.accumulation > 1
    fixed_world_size: bool = False  # a resume must run on as many ranks as the run started on

    @classmethod
    def resolve_config(cls, cfg):
        """`cfg` with this method's defaults filled in (settings left for the method to choose are
        None): the settings the run uses, which its saved config.yaml records. A new object; the
        caller's is not changed."""
        return replace(cfg)

    @classmethod
    def from_config(cls, settings: RunSettings, tokenizer, rank: int = 0) -> Method:
        """The method with its data loaded as `settings.data` says (`qatune train` calls this)."""
        raise NotImplementedError

    def setup(self, run: RunContext) -> None:
        self.run = run

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def plan(self, run: RunContext) -> StepPlan:
        raise NotImplementedError

    def step(self, model: nn.Module, batch, monitor: bool = False) -> StepOutput:
        raise NotImplementedError

    def summarize(self, totals: dict[str, float], count: int) -> dict:
        return {}

    def eval_batches(self) -> Sequence:
        """The held-out micro-batches (all of them; the runtime deals them out over ranks)."""
        return []

    def evaluate(self, model: nn.Module) -> dict:
        """Mean loss over the held-out batches: `eval_loss`, and the summed metrics, prefixed."""
        batches = self.eval_batches()
        if not batches:
            return {}
        loss_sum, count, totals = evaluate_sums(model, self, batches, self.run.precision)
        out = {"eval_loss": loss_sum / count if count else math.nan}
        out.update({f"eval_{k}": v for k, v in self.summarize(totals, count).items()})
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def export_info(self) -> dict:
        """What the export's qatune.json records beside the weights (template, max_len …)."""
        return {}

    def export(self, model: nn.Module, run: RunContext, info: dict, files: dict[str, str]) -> Path | None:
        """`files`: what the runtime writes beside the weights (qatune.json, the model card)."""
        return export_lm(model, run, info, files)
