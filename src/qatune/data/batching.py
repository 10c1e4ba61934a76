"""Turning encoded examples into batches without spending compute on padding.

Two strategies, both reporting their padding fraction:
- packing: several examples share a row of at most `max_len` tokens (best-fit decreasing bin
  packing); `doc_ids` make attention block-causal within each example, positions restart at 0,
  and targets are shifted *within* each example, so a row trains exactly like its examples alone.
- length grouping: one example per row, rows of similar length batched together, right padding.
  With right padding and causal attention no real token ever sees a pad, so no mask is needed.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from qatune.data.example import IGNORE, EncodedExample


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) shifted: targets[:, i] is predicted at position i; IGNORE = no loss
    position_ids: torch.Tensor  # (B, T)
    doc_ids: torch.Tensor | None  # (B, T) for packed rows; None when plain causal attention is right
    n_examples: int
    n_tokens: int  # real (non-padding) tokens
    n_label_tokens: int

    label_index: torch.Tensor | None = None  # flat positions of the labels, set by `to` (see there)

    def _map(self, fn) -> Batch:
        tensors = (self.input_ids, self.targets, self.position_ids, self.doc_ids, self.label_index)
        ids, targets, pos, docs, index = (None if t is None else fn(t) for t in tensors)
        return Batch(ids, targets, pos, docs, self.n_examples, self.n_tokens, self.n_label_tokens, index)

    def to(self, device) -> Batch:
        """The batch on `device`, with `label_index` computed here from the host's targets: the
        loss then gathers its rows with `index_select`, which never waits for the device (a
        boolean mask on a GPU tensor would: its output size is only known there)."""
        batch = self if self.targets.is_cuda else replace(self, label_index=labelled_positions(self.targets))
        return batch._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """Page-locked host copies, so that `to(cuda)` runs asynchronously."""
        return self._map(lambda t: t.pin_memory())

    @property
    def count(self) -> int:
        """The loss normalizer of this micro-batch: its label tokens."""
        return self.n_label_tokens

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.n_tokens / self.input_ids.numel()


def labelled_positions(targets: torch.Tensor) -> torch.Tensor:
    """Flat indices (into targets.flatten()) of the positions that carry a label."""
    return (targets.flatten() != IGNORE).nonzero().squeeze(1)


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` grouped into bins of total <= capacity.

    Each item, longest first, goes to the fullest bin it still fits in. Runs in O(n log n) by
    keeping bins bucketed by remaining capacity (at most capacity+1 distinct values).
    """
    if any(n > capacity for n in lengths):
        worst = max(range(len(lengths)), key=lambda i: lengths[i])
        raise ValueError(f"example {worst} has {lengths[worst]} tokens, more than the row capacity {capacity}")
    bins: list[list[int]] = []
    free_caps: list[int] = []  # sorted distinct remaining capacities that some bin has
    by_cap: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect.bisect_left(free_caps, n)
        if k == len(free_caps):
            b, cap = len(bins), capacity
            bins.append([])
        else:
            cap = free_caps[k]
            b = by_cap[cap].pop()
            if not by_cap[cap]:
                del by_cap[cap]
                free_caps.pop(k)
        bins[b].append(i)
        rest = cap - n
        if rest not in by_cap:
            by_cap[rest] = []
            bisect.insort(free_caps, rest)
        by_cap[rest].append(b)
    return bins


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0, window: int = 64) -> list[list[int]]:
    """Batches of `batch_size` indices with similar lengths, in random order.

    Shuffle, cut into windows of `window * batch_size`, sort each window by length, split into
    batches, shuffle the batches: similar lengths together, yet a random curriculum.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = window * batch_size
    batches = []
    for w in range(0, len(order), span):
        chunk = sorted(order[w : w + span], key=lambda i: lengths[i])
        batches += [chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(rows: Sequence[Sequence[EncodedExample]], pad_id: int, width: int | None = None) -> Batch:
    """Rows of one or more examples each -> padded tensors (right padding, to the longest row or
    `width`). doc_ids are set only when some row holds more than one example."""
    lengths = [sum(len(e) for e in row) for row in rows]
    width = width or max(lengths)
    packed = any(len(row) > 1 for row in rows)
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    targets = torch.full((B, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    doc_ids = torch.full((B, width), -1, dtype=torch.long) if packed else None
    n_examples = n_labels = 0
    for r, row in enumerate(rows):
        pos = 0
        for d, ex in enumerate(row):
            n = len(ex)
            if pos + n > width:
                raise ValueError(f"row {r} holds {lengths[r]} tokens, more than the width {width}")
            input_ids[r, pos : pos + n] = torch.tensor(ex.input_ids)
            targets[r, pos : pos + n] = torch.tensor(ex.shifted_targets())
            position_ids[r, pos : pos + n] = torch.arange(n)
            if doc_ids is not None:
                doc_ids[r, pos : pos + n] = d
            pos += n
            n_examples += 1
        n_labels += int((targets[r] != IGNORE).sum())
    return Batch(input_ids, targets, position_ids, doc_ids, n_examples, sum(lengths), n_labels)


def padding_fraction(row_lengths: Sequence[int], widths: Sequence[int]) -> float:
    """Share of computed positions that are padding, for rows of the given lengths and widths."""
    total = sum(widths)
    return 1.0 - sum(row_lengths) / total if total else 0.0


def model_inputs(batch) -> dict:
    """The forward's keyword arguments of a collated batch (a Batch or a PairBatch): token ids,
    per-document positions and document ids (block-causal attention over packed rows)."""
    return {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "doc_ids": batch.doc_ids}


def pad_id(tokenizer) -> int:
    """The token id that fills padding: the tokenizer's pad token, else its EOS. Padding is masked
    out of attention and loss, so any valid id computes the same; EOS is what `load_tokenizer`
    makes the pad token (GPT-2 has none), so every path pads alike. 0 without a tokenizer."""
    if tokenizer is None:
        return 0
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
