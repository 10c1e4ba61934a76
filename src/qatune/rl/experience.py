"""Experience: sampled responses with what training needs per token, and their packed micro-batches.

A rollout becomes one `Experience` per response (CPU tensors, one entry per response token). A
micro-batch packs several of them into rows the way SFT packs examples (`qatune.data.batching`):
prompt + response as one document, labels on the response only, block-causal attention, positions
restarted per document. The per-token tensors are concatenated in the same order as the rows'
labelled positions (row-major), so `hidden[targets != IGNORE]` lines up with them one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from qatune.data.batching import Batch, collate, pack_bins
from qatune.data.example import IGNORE, EncodedExample

PER_TOKEN = ("old_logprobs", "ref_logprobs", "advantages", "returns", "old_values")


@dataclass
class Experience:
    prompt_ids: list[int]
    response_ids: list[int]
    old_logprobs: torch.Tensor  # (R,) the sampling policy's log-probs
    ref_logprobs: torch.Tensor  # (R,) the reference's
    advantages: torch.Tensor  # (R,)
    returns: torch.Tensor | None = None  # (R,) value targets (PPO)
    old_values: torch.Tensor | None = None  # (R,) the value head's outputs at sampling time (PPO)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def example(self) -> EncodedExample:
        labels = [IGNORE] * len(self.prompt_ids) + self.response_ids
        return EncodedExample(self.prompt_ids + self.response_ids, labels, "rl")


@dataclass
class RLBatch:
    """A packed micro-batch of experiences plus their per-token tensors, flat in label order."""

    batch: Batch
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    old_values: torch.Tensor | None
    rollout_stats: dict | None = None  # on the first micro-batch of the step that sampled the rollout
    order: list[int] | None = None  # the experiences' indices (into make_batch's list) in label order

    @property
    def count(self) -> int:  # the loss normalizer: response tokens
        return self.batch.n_label_tokens

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def n_examples(self) -> int:
        return self.batch.n_examples

    def to(self, device) -> RLBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        move = lambda v: v.to(device) if isinstance(v, (torch.Tensor, Batch)) else v
        return RLBatch(**{k: move(v) for k, v in moved.items()})


def make_batch(experiences: Sequence[Experience], row_capacity: int, pad_id: int) -> RLBatch:
    """Pack experiences into rows of at most `row_capacity` tokens (best fit) and line up their
    per-token tensors with the labelled positions."""
    bins = pack_bins([len(e) for e in experiences], row_capacity)
    order = [i for b in bins for i in b]
    batch = collate([[experiences[i].example() for i in b] for b in bins], pad_id)
    ordered = [experiences[i] for i in order]
    flat = {}
    for name in PER_TOKEN:
        parts = [getattr(e, name) for e in ordered]
        flat[name] = None if parts[0] is None else torch.cat(parts).float()
    assert flat["old_logprobs"].numel() == batch.n_label_tokens  # one entry per labelled position
    return RLBatch(batch, **flat, order=order)
