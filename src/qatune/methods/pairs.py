"""What DPO and the reward model share: preference pairs as the runtime's items.

Data: encoded pairs (`qatune.data.preference.pipeline.load_pairs`), a seeded held-out split of
pairs, micro-batches of pairs through the runtime's `ExamplePlan` (`batch.size` counts pairs, or
tokens of both sequences with `batch.unit: tokens`). A micro-batch packs its pairs into rows of
up to 2 x max_len tokens (a pair is two sequences of at most max_len each), block-causal; with
`batch.strategy: grouped`, one pair per row. The loss is a mean over the pairs of the whole step.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from qatune.data.batching import pad_id
from qatune.data.plan import ExamplePlan, held_out_split
from qatune.data.preference.batching import PairBatch, collate_pairs
from qatune.data.preference.encode import EncodedPair
from qatune.errors import UserError
from qatune.model.families import context_length
from qatune.train.method import Method, RunContext, RunSettings


@dataclass(frozen=True)
class PairItem:
    """A pair with its index in the data set (what caches such as reference log-probs key on)."""

    index: int
    pair: EncodedPair

    def __len__(self) -> int:
        return self.pair.n_tokens


class PairMethod(Method):
    train_without_dropout = True  # DPO: against the reference's eval forward; reward: two scores compared

    @classmethod
    def resolve_config(cls, cfg):
        """data.truncation as the pair policy it means (`cut_response`, the SFT default, is cut_pair)."""
        from qatune.data.preference.truncation import pair_policy

        return replace(cfg, data=replace(cfg.data, truncation=pair_policy(cfg.data.truncation)))

    def __init__(
        self,
        pairs: Sequence[EncodedPair],
        template: dict | None = None,
        meta: dict | None = None,
        eval_pairs: Sequence[EncodedPair] | None = None,
    ) -> None:
        """eval_pairs: a caller's own held-out pairs (no split of `pairs` then)."""
        self.pairs, self.template, self.meta = list(pairs), template, meta or {}
        self.eval_pairs = list(eval_pairs) if eval_pairs is not None else None

    @classmethod
    def from_config(cls, settings: RunSettings, tokenizer, rank: int = 0):
        from qatune.data.preference.pipeline import load_pairs

        loaded = load_pairs(settings.data, tokenizer)
        if rank == 0:
            print(f"data: {loaded.report.summary()}", file=sys.stderr)
        return cls(loaded.pairs, loaded.template.to_dict(), meta={"data_report": loaded.report.to_dict()})

    def setup(self, run: RunContext) -> None:
        super().setup(run)
        cfg = run.settings
        self.chunk_size = cfg.loss_chunk
        self.max_len = min(cfg.data.max_len, context_length(run.model.config))
        too_long = next((p for p in self.all_pairs() if p.longest > self.max_len), None)
        if too_long is not None:
            raise UserError(f"{too_long.where}: {too_long.longest} tokens in one sequence, over max_len {self.max_len}")
        tok = run.tokenizer
        self.pad_id = pad_id(tok)
        self.eos_id = tok.eos_token_id if tok is not None else run.model.config.vocab_size - 1
        self.capacity = 2 * self.max_len if cfg.batch.strategy == "packed" else 1
        # one index space for caches: the caller's held-out pairs come after the training pairs
        items = [PairItem(i, p) for i, p in enumerate(self.all_pairs())]
        given = items[len(self.pairs) :] if self.eval_pairs is not None else None
        split = (cfg.eval.fraction, cfg.eval.max_examples, cfg.seed)
        self.train_items, held_out = held_out_split(items[: len(self.pairs)], given, *split)
        size = cfg.eval.batch_size
        self.held_out = [self.collate(held_out[s : s + size]) for s in range(0, len(held_out), size)]

    def all_pairs(self) -> list[EncodedPair]:
        """Training pairs, then the caller's held-out pairs if any: the index space of PairItem."""
        return self.pairs + (self.eval_pairs or [])

    def collate(self, items: Sequence[PairItem]) -> PairBatch:
        return collate_pairs([x.pair for x in items], [x.index for x in items], self.pad_id, self.capacity, self.eos_id)

    def plan(self, run: RunContext) -> ExamplePlan:
        cfg = run.settings
        return ExamplePlan.build(self.train_items, cfg.batch, cfg.seed, cfg.epochs, cfg.max_steps, run, self.collate)

    def eval_batches(self) -> Sequence[PairBatch]:
        return self.held_out

    def export_info(self) -> dict:
        from qatune.data.preference.truncation import pair_policy

        policy = pair_policy(self.run.settings.data.truncation)
        return {
            "method": self.name,
            "template": self.template,
            "max_len": self.max_len,
            "truncation": policy,
            **self.meta,
        }
