"""`GPT2.forward(outputs=...)`: only the hidden states a loss reads, the last block cut to them.

Values and gradients must equal the full forward's rows whatever the kernel, the order of the
positions, padding, rows that start mid-document or skip positions, checkpointing, LoRA and the sparse embedding
gradient; the SFT step through it must equal the plain full-logits cross-entropy."""

from __future__ import annotations

import pytest
import torch
from tests.test_train_step import SMALL, assert_same, examples_of_varied_lengths

from qatune.data.batching import collate
from qatune.data.example import IGNORE
from qatune.kernels.loss import reference_loss_sum
from qatune.methods.sft.monitor import monitor_targets, prompt_targets
from qatune.methods.sft.step import train_step
from qatune.model.gpt2 import GPT2, LastBlockRows
from qatune.model.lora import LoRAConfig, apply_lora
from qatune.train.step import Precision, scored_rows_only

# Two rows: [doc 5 | doc 7 | 4 padding], [doc 9 | doc 7]
DOCS = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 4, [0] * 9 + [1] * 7])
POSITIONS = torch.tensor(
    [[*range(5), *range(7), 0, 0, 0, 0], [*range(9), *range(7)]],
)
# unordered; doc 0 of row 0 from its 4th token (rows after the document's start), doc 0 of row 1
# with a gap (positions 1, 2, 4), doc 1 of row 1 whole (plain causal), a document with no wanted
# position (row 0's second)
OUTPUTS = torch.tensor([3, 4, 17, 18, 20, 31, 26, 25, 27, 28, 29, 30])


@pytest.fixture
def model() -> GPT2:
    torch.manual_seed(0)
    return GPT2(SMALL).double()


def rows_and_grads(model, kernel: str, outputs, sparse: bool = False):
    model.zero_grad(set_to_none=True)
    model.attention_kernel = kernel
    ids = torch.randint(1, SMALL.vocab_size, DOCS.shape, generator=torch.Generator().manual_seed(1))
    if outputs is None:
        hidden = model(ids, POSITIONS, DOCS).flatten(0, 1)[OUTPUTS]
    else:
        hidden = model(ids, POSITIONS, DOCS, outputs=outputs, sparse_embedding_grad=sparse)
    weights = torch.linspace(-1, 1, hidden.numel(), dtype=hidden.dtype).view_as(hidden)
    (hidden * weights).sum().backward()
    grads = {n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), grads


@pytest.mark.parametrize("kernel", ["documents", "dense"])
@pytest.mark.parametrize("sparse", [False, True])
def test_outputs_equal_the_full_forwards_rows_in_values_and_gradients(model, kernel, sparse):
    ref, ref_grads = rows_and_grads(model, "dense", None)
    got, grads = rows_and_grads(model, kernel, OUTPUTS, sparse)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    assert_same(ref_grads, grads, rtol=1e-10)


def test_checkpointing_and_lora_take_the_same_cut(model):
    apply_lora(model, LoRAConfig(r=4, targets=["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]))
    for p in model.parameters():  # B starts at zero: give the adapters something to pass on
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    model.double()
    ref, ref_grads = rows_and_grads(model, "dense", None)
    model.activation_checkpointing = True
    got, grads = rows_and_grads(model, "documents", OUTPUTS)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert_same(ref_grads, grads, rtol=1e-10)


def test_rows_are_exactly_the_wanted_positions_grouped_by_document(model):
    from qatune.model.gpt2 import DocumentAttention

    rows = LastBlockRows(DocumentAttention(DOCS), OUTPUTS)
    # real tokens: row 0 doc 0 = 0..4, doc 1 = 5..11; row 1 doc 0 = 12..20, doc 1 = 21..27
    # (flat 16..24 and 25..31); wanted: 3, 4 | 13, 14, 16 (row 1 positions 1, 2, 4) | 21..27
    assert rows.index.tolist() == [3, 4, 13, 14, 16, *range(21, 28)]  # 15 (flat 19): not asked for
    assert [(start, p.tolist()) for start, p in rows.docs] == [(0, [3, 4]), (12, [1, 2, 4]), (21, list(range(7)))]
    # the output order: the rows are gathered back into the order asked for
    assert rows.order.tolist() == [0, 1, 2, 3, 4, 11, 6, 5, 7, 8, 9, 10]


def test_padding_positions_and_the_kv_cache_are_refused(model):
    ids = torch.ones_like(DOCS)
    with pytest.raises(ValueError, match="padding positions"):
        model(ids, POSITIONS, DOCS, outputs=torch.tensor([3, 13]))
    with pytest.raises(ValueError, match="KV cache"):
        model(ids[:1, :4], outputs=torch.tensor([0]), kv_cache=model.new_kv_cache(1, 8))


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_sft_step_through_the_cut_equals_full_logits_cross_entropy(model, micro_batches):
    # Two micro-batches: the head's weight gradient is added into `.grad` in place (where the
    # first one put it) and the embedding's sparse rows land on top of both.
    exs = examples_of_varied_lengths(6)
    halves = [exs[:3], exs[3:]]
    rows = [halves] if micro_batches == 1 else [[h] for h in halves]
    batches = [collate(r, pad_id=0).to("cpu") for r in rows]  # .to(): the label index is built there
    assert scored_rows_only(model, batches[0].label_index)["outputs"] is batches[0].label_index
    model.zero_grad(set_to_none=True)
    stats = train_step(model, batches, Precision("fp32", torch.device("cpu")))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert model.wte.weight.grad.layout == torch.strided  # what the optimizer and clipping read
    model.zero_grad(set_to_none=True)
    count = sum(b.count for b in batches)
    ref = 0
    for b in batches:
        hidden = model(b.input_ids, b.position_ids, b.doc_ids)
        ref = ref + reference_loss_sum(hidden, model.wte.weight, b.targets) / count
    ref.backward()
    assert stats.loss == pytest.approx(float(ref.detach()), rel=1e-12)
    assert_same({n: p.grad for n, p in model.named_parameters()}, grads, rtol=1e-10)


def test_monitor_samples_prompt_positions_across_documents_and_adds_only_their_rows():
    # 6 documents of 12 prompt tokens and 8 answer tokens each: 66 prompt positions, 48 labels
    from qatune.data.example import EncodedExample
    from qatune.model.gpt2 import DocumentAttention

    exs = [EncodedExample(list(range(1, 21)), [IGNORE] * 12 + list(range(13, 21)), f"ex{i}") for i in range(6)]
    batch = collate([exs[:3], exs[3:]], pad_id=0).to("cpu")  # .to(): builds the label index
    index, targets = monitor_targets(batch)
    assert 0 < len(index) <= batch.count // 8 == 6
    every = prompt_targets(batch).flatten()
    assert torch.equal(targets, every[index]) and bool((targets != IGNORE).all())
    assert len({int(i) // 20 for i in index}) == 6  # spread over every document (20 tokens each)
    assert torch.equal(monitor_targets(batch)[0], index)  # systematic: the same sample every time
    # the last block computes the labels and the sampled positions, nothing in between
    wanted = torch.cat([batch.label_index, index])
    rows = LastBlockRows(DocumentAttention(batch.doc_ids), wanted)
    assert rows.index.numel() == batch.count + len(index)
    short = collate([[EncodedExample([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4], "s")]], pad_id=0)
    assert len(monitor_targets(short)[0]) == 1  # one prompt position, at most max(2 // 8, 1) = 1
