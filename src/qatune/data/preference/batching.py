"""Preference pairs -> packed micro-batches: chosen and rejected in one forward.

A pair is two documents, prompt + chosen and prompt + rejected, placed side by side in a row;
rows hold several pairs (best-fit decreasing, as SFT packing), attention is block-causal
(`doc_ids`), positions restart at every document. The scored positions — each response's tokens
and its EOS, predicted from the position before — are read in row-major order, so every pair's
rows are contiguous: chosen's, then rejected's. `row_seq` says which sequence each scored row
belongs to (2k: pair k's chosen, 2k+1: its rejected) and `bounds` where each pair's rows start,
which is what a loss over pairs computed chunk by chunk needs (`qatune.kernels.logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from qatune.data.batching import collate, labelled_positions, pack_bins
from qatune.data.preference.encode import EncodedPair


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) shifted; IGNORE except where a response token is predicted
    position_ids: torch.Tensor  # (B, T)
    doc_ids: torch.Tensor | None  # (B, T); block-causal attention
    label_index: torch.Tensor  # (N,) flat positions (into B*T) of the scored rows, row-major order
    row_seq: torch.Tensor  # (N,) sequence of each scored row
    seq_tokens: torch.Tensor  # (2P,) scored tokens per sequence (response + EOS)
    last_token: torch.Tensor  # (2P,) flat index into (B*T) of each response's last token before EOS
    margins: torch.Tensor  # (P,) the data's margin per pair (0 where none)
    bounds: list[int]  # pair k's scored rows are bounds[k]:bounds[k+1]
    pair_ids: list[int]  # which pairs (indices into the data set), in batch order
    n_tokens: int  # real tokens (both sequences)

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    # The runtime's batch interface: the loss is a mean over pairs.
    @property
    def count(self) -> int:
        return self.n_pairs

    @property
    def n_examples(self) -> int:
        return self.n_pairs

    def _map(self, fn) -> PairBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PairBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device) -> PairBatch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> PairBatch:
        """Page-locked host copies, so that `to(cuda)` runs asynchronously."""
        return self._map(lambda t: t.pin_memory())


def pack_pairs(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of pair indices (best-fit decreasing on each pair's two-sequence length)."""
    return pack_bins(lengths, capacity)


def collate_pairs(
    pairs: Sequence[EncodedPair], pair_ids: Sequence[int], pad_id: int, capacity: int, eos_id: int | None = None
) -> PairBatch:
    """Pairs packed into rows of at most `capacity` tokens (each row at least one whole pair).

    eos_id: the EOS id, so that the reward model's scored position is the last token *before* a
    final EOS — the token `GPT2ForSequenceClassification` scores with pad_token_id = EOS."""
    rows = pack_pairs([p.n_tokens for p in pairs], max(capacity, max(p.n_tokens for p in pairs)))
    # Rows in first-appearance order of their pairs keeps the batch deterministic and readable.
    order = [k for row in rows for k in row]
    docs = [[seq for k in row for seq in pairs[k].sequences()] for row in rows]
    base = collate(docs, pad_id)
    width = base.input_ids.shape[1]
    seq_tokens, last_token = [], []
    for r, row in enumerate(rows):
        start = 0
        for k in row:
            p = pairs[k]
            for response in (p.chosen_ids, p.rejected_ids):
                end = start + len(p.prompt_ids) + len(response)
                seq_tokens.append(len(response))
                last = end - 1 - (len(response) > 1 and eos_id is not None and response[-1] == eos_id)
                last_token.append(r * width + last)
                start = end
    seq_tokens_t = torch.tensor(seq_tokens)
    if base.n_label_tokens != sum(seq_tokens):  # a prompt of 0 tokens would leave a response token unscored
        raise ValueError(f"{base.n_label_tokens} scored positions for {sum(seq_tokens)} response tokens")
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), seq_tokens_t.view(-1, 2).sum(1).cumsum(0)]).tolist()
    return PairBatch(
        input_ids=base.input_ids,
        targets=base.targets,
        position_ids=base.position_ids,
        doc_ids=base.doc_ids,  # every row holds at least the two documents of a pair
        # Indices built here, on the host: gathering with them never waits for the device (a
        # boolean mask would: the size of its result is only known there).
        label_index=labelled_positions(base.targets),
        row_seq=torch.repeat_interleave(torch.arange(len(seq_tokens)), seq_tokens_t),
        seq_tokens=seq_tokens_t,
        last_token=torch.tensor(last_token),
        margins=torch.tensor([pairs[k].margin or 0.0 for k in order], dtype=torch.float32),
        bounds=bounds,
        pair_ids=[pair_ids[k] for k in order],
        n_tokens=base.n_tokens,
    )
