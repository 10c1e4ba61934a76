"""Packing and length grouping: bins respect capacity, rows train exactly like their examples."""

from __future__ import annotations

import random

import pytest
import torch

from qatune.data.batching import collate, length_grouped_batches, pack_bins
from qatune.data.example import IGNORE, EncodedExample
from qatune.kernels.loss import response_loss_sum


def example(n_prompt: int, n_resp: int, seed: int) -> EncodedExample:
    g = random.Random(seed)
    ids = [g.randrange(0, 50000) for _ in range(n_prompt + n_resp)]
    return EncodedExample(ids, [IGNORE] * n_prompt + ids[n_prompt:])


def test_pack_bins_respects_capacity_and_uses_every_item_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = pack_bins(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= 1.05 * lower_bound + 1  # best-fit decreasing is near-optimal here


def test_pack_bins_rejects_an_item_longer_than_a_row():
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        pack_bins([3, 9], 8)


def test_length_grouped_batches_cover_everything_once_and_group_lengths():
    rng = random.Random(1)
    lengths = [rng.randint(1, 1000) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 8, seed=0, window=1000)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30  # random batches of 8 would spread ~780


def test_packed_row_gives_the_loss_and_grads_of_separate_examples(tiny_model):
    exs = [example(5, 4, 0), example(3, 8, 1), example(6, 2, 2)]
    model = tiny_model.double().eval()  # fp64: the comparison tests the packing, not fp32 summation order

    def loss_and_grads(batch):
        model.zero_grad()
        h = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
        loss, n = response_loss_sum(h, model.wte.weight, batch.targets)
        loss.backward()
        return loss.detach(), n, [p.grad.clone() for p in model.parameters()]

    packed = collate([exs], pad_id=50256, width=32)
    assert packed.doc_ids is not None and packed.n_tokens == 28 and packed.n_label_tokens == 4 + 8 + 2
    lp, np_, gp = loss_and_grads(packed)
    unpacked = collate([[e] for e in exs], pad_id=50256)
    assert unpacked.doc_ids is None
    lu, nu, gu = loss_and_grads(unpacked)
    assert np_ == nu
    # fp64 rounding ~1e-16 x a few hundred terms: 1e-10 is tight and holds on any CPU
    torch.testing.assert_close(lp, lu, rtol=1e-10, atol=1e-10)
    for a, b in zip(gp, gu):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
