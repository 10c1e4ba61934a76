"""`compile: true`: the forward compiles as one graph, once, for packed rows of any length, and
the compiled step gives the eager step's loss and gradients."""

from __future__ import annotations

import torch
from tests.test_train_step import SMALL, examples_of_varied_lengths

from qatune.data.plan import make_batch
from qatune.methods.sft.step import train_step
from qatune.model.gpt2 import GPT2
from qatune.train.runtime import compile_model
from qatune.train.step import Precision

PAD = 0


def packed_batches():
    """Packed micro-batches whose rows differ in length and count from one batch to the next (at
    least 2 rows: torch.compile specializes a size of 1, so one row would compile once more)."""
    exs = examples_of_varied_lengths(24, seed=1)
    return [make_batch(exs[i : i + n], "packed", 128, PAD) for i, n in ((0, 4), (2, 5), (13, 8), (10, 6))]


def test_packed_forward_is_one_graph_compiled_once():
    """fullgraph: any graph break is an error; the batches' lengths change every call
    (torch.compile recompiled for each new length before, behind a break in the forward)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT2(SMALL)
    batches = packed_batches()
    assert len({tuple(b.input_ids.shape) for b in batches}) == len(batches)
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for b in batches:
            got = compiled(b.input_ids, position_ids=b.position_ids, doc_ids=b.doc_ids)
            want = model(b.input_ids, position_ids=b.position_ids, doc_ids=b.doc_ids)
            real = b.doc_ids >= 0  # padding: zeros eager (per-document kernel), unused values compiled (dense mask)
            torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_compiled_step_equals_eager_step():
    """The runtime's compiled model (inductor's C++ kernels): same loss and gradients as eager,
    fp32, to rounding (dense-mask attention there vs per-document here, fused elementwise code)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT2(SMALL)
    precision = Precision("fp32", torch.device("cpu"))
    compiled = compile_model(model)
    for b in packed_batches()[:2]:
        results = []
        for m in (model, compiled):
            model.zero_grad(set_to_none=True)
            loss = train_step(m, [b], precision).loss
            results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (eager_loss, eager_grads), (loss, grads) = results
        assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
        for name, g in eager_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5 * g.abs().max().item(), rtol=0, msg=name)


def test_compiled_llama_under_bf16_autocast_equals_eager():
    """A Llama-family model compiled (inductor) under CPU bf16 autocast: eager runs the stacked
    projections' autograd functions (`llama.RotateStacked`, `SwiGLUStacked`), the compiled model
    the plain ops they replace (inductor could not lower the functions' writes into slices: the
    compile failed). Same loss and gradients to bf16 rounding."""
    from qatune.model.llama import Llama, LlamaConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = LlamaConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, d_ff=96, vocab_size=128)
    model = Llama(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 40))
    results = []
    for m in (model, compile_model(model)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = m(ids)
        loss = model.lm_head(hidden).float().logsumexp(-1).mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    assert abs(loss - eager_loss) <= 1e-3 * abs(eager_loss)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, atol=2e-2 * g.abs().max().item(), rtol=0, msg=name)
