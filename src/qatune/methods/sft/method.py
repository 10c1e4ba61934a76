"""Supervised fine-tuning: cross-entropy on response tokens only, normalized by the label tokens
of the whole optimizer step.

Data: encoded (prompt, response) examples (`qatune.data.pipeline.load_examples`), a seeded
held-out split, packed or length-grouped micro-batches (`ExamplePlan`). Step: the model's hidden
states, then the chunked LM head only at labelled positions (`qatune.kernels.loss`). With
`monitor`, the same forward also measures the loss on prompt tokens, without gradient, on a
sample of at most one prompt position per 8 labels.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from qatune.data.batching import Batch, model_inputs, pad_id
from qatune.data.example import EncodedExample
from qatune.data.plan import ExamplePlan, eval_batches, held_out_split, make_batch
from qatune.errors import UserError
from qatune.kernels.loss import DEFAULT_CHUNK, perplexity, response_loss_sum, rows_loss_sum
from qatune.methods.sft.monitor import monitor_targets
from qatune.model.families import context_length
from qatune.train.method import STEP_FIELDS, Method, RunContext, RunSettings, StepOutput
from qatune.train.step import evaluate_sums, lm_weight, phase, scored_rows_only


def lm_eval_metrics(loss_sum: float, count: int) -> dict:
    loss = loss_sum / count if count else float("nan")
    return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_label_tokens": int(count)}


class SFT(Method):
    name = "sft"
    title = "supervised fine-tuning, loss on response tokens only"
    progress_fields = (*STEP_FIELDS, ("eval_loss", "eval {:.4f}"), ("eval_ppl", "ppl {:.2f}"))
    summary_fields = (
        ("eval_loss", "held-out response loss (nats / token)"),
        ("eval_ppl", "held-out perplexity"),
        ("loss", "training loss (last step)"),
    )

    def __init__(
        self,
        examples: Sequence[EncodedExample],
        template: dict | None = None,
        eval_examples: Sequence[EncodedExample] | None = None,
        meta: dict | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        self.examples, self.template, self.eval_examples = examples, template, eval_examples
        self.meta = meta or {}
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, settings: RunSettings, tokenizer, rank: int = 0) -> SFT:
        from qatune.data.pipeline import load_examples

        loaded = load_examples(settings.data, tokenizer)
        if rank == 0:
            print(f"data: {loaded.report.summary()}", file=sys.stderr)
            for line in loaded.report.messages():
                print(line, file=sys.stderr)
        return cls(loaded.examples, loaded.template.to_dict(), meta={"data_report": loaded.report.to_dict()})

    @classmethod
    def stepper(cls, chunk_size: int = DEFAULT_CHUNK) -> SFT:
        """Just the step, for callers holding their own batches (tests, `qatune grads`, plan)."""
        return cls([], chunk_size=chunk_size)

    def setup(self, run: RunContext) -> None:
        super().setup(run)
        cfg = run.settings
        self.chunk_size = cfg.loss_chunk
        self.max_len = min(cfg.data.max_len, context_length(run.model.config))
        too_long = [i for i, e in enumerate(self.examples) if len(e) > self.max_len]
        if too_long:
            n = len(self.examples[too_long[0]])
            raise UserError(f"example {too_long[0]} has {n} tokens, over max_len {self.max_len}")
        split = (cfg.eval.fraction, cfg.eval.max_examples, cfg.seed)
        self.train_set, eval_set = held_out_split(self.examples, self.eval_examples, *split)
        self.pad_id = pad_id(run.tokenizer)
        self.held_out = eval_batches(eval_set, cfg.batch.strategy, self.max_len, self.pad_id, cfg.eval.batch_size)

    def plan(self, run: RunContext) -> ExamplePlan:
        cfg = run.settings
        strategy, max_len, pad_id = cfg.batch.strategy, self.max_len, self.pad_id
        collate = lambda items: make_batch(items, strategy, max_len, pad_id)
        args = (self.train_set, cfg.batch, cfg.seed, cfg.epochs, cfg.max_steps, run, collate)
        return ExamplePlan.build(*args, row_capacity=max_len)

    def step(self, model, batch: Batch, monitor: bool = False) -> StepOutput:
        # With `monitor`, the prompt positions sampled for the prompt-token loss (at most one per 8
        # labels) come out of the same forward as the labels, the last block computing just those
        # rows more. Cost: benchmarks/monitor_cost.py.
        prompt = monitor_targets(batch) if monitor else None
        rows = batch.label_index
        if prompt is not None and rows is not None:
            rows = torch.cat([rows, prompt[0].to(rows.device)])
        cut = scored_rows_only(model, rows)
        with phase("forward"):
            hidden = model(**model_inputs(batch), **cut)
        if not cut:  # every position's hidden state: select the rows here
            return self._step_full(hidden, lm_weight(model), batch, prompt)
        weight, n = lm_weight(model), batch.count
        targets = batch.targets.flatten().index_select(0, batch.label_index)
        with phase("loss"):
            into_grad = cut["sparse_embedding_grad"]
            loss_sum = rows_loss_sum(hidden[:n], weight, targets, self.chunk_size, weight_grad_into_grad=into_grad)
        return StepOutput(loss_sum, n, self._prompt_metrics(hidden[n:], weight, prompt))

    def _step_full(self, hidden, weight, batch: Batch, prompt) -> StepOutput:
        with phase("loss"):
            loss_sum, _ = response_loss_sum(hidden, weight, batch.targets, self.chunk_size, index=batch.label_index)
        if prompt is not None:
            hidden = hidden.flatten(0, -2).index_select(0, prompt[0].to(hidden.device))
        return StepOutput(loss_sum, batch.count, self._prompt_metrics(hidden, weight, prompt))

    def _prompt_metrics(self, rows: torch.Tensor, weight, prompt) -> dict:
        """The prompt-token loss at the sampled rows, without gradient (before backward: FSDP
        reshards the root's weights after it)."""
        if prompt is None:
            return {}
        with torch.no_grad(), phase("monitor"):
            prompt_sum = rows_loss_sum(rows, weight, prompt[1].to(rows.device), self.chunk_size)
        return {"prompt_loss_sum": prompt_sum, "prompt_tokens": int(prompt[1].numel())}

    def summarize(self, totals: dict[str, float], count: int) -> dict:
        out = {"label_tokens": count}
        if totals.get("prompt_tokens"):
            out["prompt_loss"] = totals["prompt_loss_sum"] / totals["prompt_tokens"]  # measured, not trained on
        return out

    def eval_batches(self) -> Sequence[Batch]:
        return self.held_out

    def evaluate(self, model) -> dict:
        if not self.held_out:
            return {}
        loss_sum, count, _ = evaluate_sums(model, self, self.held_out, self.run.precision)
        return lm_eval_metrics(loss_sum, count)

    def export_info(self) -> dict:
        truncation = self.run.settings.data.truncation
        return {"template": self.template, "max_len": self.max_len, "truncation": truncation, **self.meta}
