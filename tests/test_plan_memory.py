"""Memory plan against real tensors: state bytes exact, activations against saved-tensor hooks."""

from __future__ import annotations

import math

import pytest

from qatune.analysis.activations import LOSS_CHUNKED, plan_activations
from qatune.analysis.measure import compare, measure_step
from qatune.analysis.memory import (
    GB,
    advice,
    fits,
    largest_micro_batch,
    lora_shapes,
    model_state,
    per_rank_state_bytes,
    plan_memory,
    shard_numel,
)
from qatune.analysis.setup import PlanSetup
from qatune.model.gpt2 import SIZES, GPT2Config

TINY = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)
N_TENSORS = 2 + 12 * TINY.n_layer + 2  # wte, wpe; 12 per block; ln_f weight and bias

# (precision, checkpointing, packed, attention kernel) x two sequence lengths: each one real step.
CASES = [
    ("fp32", False, False, "flash"),
    ("fp32", True, False, "flash"),
    ("bf16", False, True, "flash"),
    ("bf16", True, True, "flash"),
    ("fp32", False, True, "math"),
    ("bf16", False, False, "math"),
]


@pytest.fixture(scope="module")
def measured():
    out = {}
    for case in CASES:
        for T in (32, 128):
            prec, ckpt, packed, attention = case
            s = PlanSetup(
                TINY,
                seq_len=T,
                micro_batch=2,
                precision=prec,
                checkpointing=ckpt,
                packed=packed,
                attention=attention,
                device="cpu",
            )
            out[case + (T,)] = (s, measure_step(s))
    return out


def test_parameter_gradient_optimizer_bytes_are_exact(measured):
    for s, m in measured.values():
        st = model_state(s)
        assert (st.weights, st.grads, st.optimizer) == (m.params, m.grads, m.optimizer)
    # fp32 AdamW: 4 (weights) + 4 (grads) + 8 (moments) bytes per parameter + a 4-byte step per tensor.
    n = model_state(s).params
    assert m.params == 4 * n and m.optimizer == 8 * n + 4 * N_TENSORS


@pytest.mark.parametrize("case", CASES)
def test_activations_within_5_percent_of_saved_tensors(measured, case):
    for T in (32, 128):
        s, m = measured[case + (T,)]
        acts = plan_activations(s)
        assert acts.total == pytest.approx(m.activations, rel=0.05)
        assert acts.weight_copies_saved == pytest.approx(m.weight_copies, rel=0.05, abs=1)


def test_checkpointing_keeps_only_block_inputs(measured):
    s, full = measured[("fp32", False, False, "flash", 128)]
    _, ckpt = measured[("fp32", True, False, "flash", 128)]
    block_inputs = TINY.n_layer * s.tokens * TINY.n_embd * 4
    per_block = sum(plan_activations(s).per_block.values())
    assert full.activations - ckpt.activations == TINY.n_layer * per_block - block_inputs


def test_block_formula_matches_the_written_shapes():
    # E*d*(2r + 14a) + 4*E*s + 4*B*h*T for flash attention.
    s = PlanSetup(SIZES["gpt2-large"], seq_len=512, micro_batch=2, precision="fp32")
    E, d, h = 1024, 1280, 20
    assert sum(plan_activations(s).per_block.values()) == E * d * (2 * 4 + 14 * 4) + 4 * E * 4 + 4 * 2 * h * 512
    b = s.with_(precision="bf16")
    assert sum(plan_activations(b).per_block.values()) == E * d * (2 * 4 + 14 * 2) + 4 * E * 4 + 4 * 2 * h * 512


def test_seed_corrections_16_bytes_per_param():
    large, xl = SIZES["gpt2-large"], SIZES["gpt2-xl"]
    for cfg, params, gb in ((large, 774_030_080, 12.38), (xl, 1_557_611_200, 24.92)):
        for precision in ("bf16-master", "bf16", "fp32"):
            st = model_state(PlanSetup(cfg, precision=precision))
            assert st.params == params
            total = st.weights + st.grads + st.master + st.optimizer
            assert total / GB == pytest.approx(gb, abs=0.01)
            assert (total - 4 * st.trainable_tensors) / st.params == 16
    # fp16 weights are 2 bytes/param: 1.5B parameters are ~3.1 GB, not 6.
    assert model_state(PlanSetup(xl, precision="fp16-master")).weights / GB == pytest.approx(3.115, abs=0.001)


def test_full_logits_cost_the_vocabulary_per_position():
    s = PlanSetup(SIZES["gpt2-large"], seq_len=1024, precision="bf16")
    chunked, full = plan_activations(s), plan_activations(s.with_(loss="full"))
    E, V, d = 1024, 50257, 1280
    assert full.saved["loss: logits (held by the caller)"] == E * V * 2
    assert full.saved["loss: fp32 log-softmax"] == E * V * 4
    assert chunked.saved[LOSS_CHUNKED] == 512 * d * 4 + V * d * 4
    # the model returns the 512 label rows only: the final LayerNorm runs on those (+ their index)
    assert chunked.saved["final LayerNorm (on the rows the loss reads)"] == 512 * (d * 4 + 2 * 4 + 8)
    # At micro-batch 1 the fused loss's V x d gradient buffer is as large as the logits; at 8 rows
    # of 1024 the full logits cost gigabytes more at the end of forward.
    eight = s.with_(micro_batch=8)
    gap = plan_memory(eight.with_(loss="full")).phases["end of forward"] - plan_memory(eight).phases["end of forward"]
    assert gap > 8 * E * V * 6 - V * d * 4 - 2048 * V * 8


def test_shards_cover_every_element_once():
    assert [shard_numel((50257, 64), 2, r) for r in range(2)] == [25129 * 64, 25128 * 64]
    assert shard_numel((5,), 4, 3) == 0  # torch.chunk: 2, 2, 1, and nothing for the last rank
    full = per_rank_state_bytes(TINY, 1, 0)
    for stage in (1, 2, 3):
        ranks = [per_rank_state_bytes(TINY, 3, stage, rank=r) for r in range(3)]
        # AdamW's step scalar is on every rank; everything else is split exactly.
        assert sum(r["optimizer"] for r in ranks) - 2 * 4 * N_TENSORS == full["optimizer"]
        assert sum(r["grads"] for r in ranks) == (full["grads"] if stage >= 2 else 3 * full["grads"])
        assert sum(r["params"] for r in ranks) == (full["params"] if stage == 3 else 3 * full["params"])


def test_zero_offload_and_lora_move_the_right_bytes():
    base = PlanSetup(SIZES["gpt2-large"], seq_len=512, precision="bf16", gpus=4)
    dp, z1, z3 = (plan_memory(base.with_(zero=z)).device for z in (0, 1, 3))
    assert z1["optimizer state"] == math.ceil(dp["optimizer state"] / 4) and z1["parameters"] == dp["parameters"]
    assert z3["parameters"] == math.ceil(dp["parameters"] / 4)
    off = plan_memory(base.with_(zero=3, offload="optimizer"))
    assert off.device["optimizer state"] == 0 and off.host["optimizer state"] == 4 * z3["optimizer state"]
    lora = PlanSetup(TINY, seq_len=64, lora_r=8, lora_targets=("attn.c_attn", "mlp.c_fc"))
    d = TINY.n_embd
    assert sum(math.prod(x) for x in lora_shapes(TINY, 8, lora.lora_targets)) == 2 * 8 * ((d + 3 * d) + (d + 4 * d))
    st = model_state(lora)
    assert st.trainable == 2 * 8 * 9 * d and st.grads == 4 * st.trainable
    assert st.weights == 4 * (model_state(lora.with_(lora_r=0)).params + st.trainable)


def test_advice_for_a_24_gb_card():
    s = PlanSetup(SIZES["gpt2-large"], seq_len=1024, micro_batch=16, precision="bf16")
    lines = advice(s, 24 * 10**9, "24 GB")
    assert lines[0].startswith("does not fit in 24 GB")
    assert lines[1].startswith("fits with activation checkpointing")
    best = largest_micro_batch(s, 24 * 10**9)
    assert fits(s.with_(micro_batch=best), 24 * 10**9) and not fits(s.with_(micro_batch=best + 1), 24 * 10**9)
    with pytest.raises(ValueError, match="precision"):
        PlanSetup(TINY, precision="int4")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    "targets", [("attn.c_attn", "attn.c_proj"), ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"), ("mlp.c_fc",)], ids="+".join
)
def test_lora_activations_and_weight_copies_are_exact(precision, packed, targets):
    """A frozen matmul saves no input, but under autocast its 16-bit weight copy when its input
    needs a gradient (not in block 0 before the first adapter, nor that adapter's A); a frozen
    c_proj does not keep the documents' outputs joined. The measurement tells a frozen weight's
    copy (no autograd history) from an activation by the op that made it (`WeightCasts`)."""
    s = PlanSetup(TINY, seq_len=64, micro_batch=2, precision=precision, packed=packed, device="cpu")
    s = s.with_(lora_r=8, lora_targets=targets)
    m, acts = measure_step(s, count_flops=False), plan_activations(s)
    assert acts.total - acts.saved[LOSS_CHUNKED] == m.activations_model
    assert acts.saved[LOSS_CHUNKED] == m.activations_loss  # no V x d grad_w: head frozen
    assert acts.weight_copies_saved == m.weight_copies


@pytest.mark.parametrize("precision, checkpointing", [("fp32", False), ("bf16", True)])
def test_measured_lora_step_matches_the_plan(precision, checkpointing):
    """`plan --measure` with LoRA: the runtime's step on qatune's adapters, against the plan."""
    s = PlanSetup(TINY, seq_len=64, micro_batch=2, precision=precision, checkpointing=checkpointing, packed=True)
    s = s.with_(lora_r=8, device="cpu")
    m, st, acts = measure_step(s), model_state(s), plan_activations(s)
    assert (st.weights, st.grads, st.optimizer) == (m.params, m.grads, m.optimizer)
    adapters = 8 * TINY.n_layer * (4 + 2 + 5 + 5) * TINY.n_embd  # r * (in + out) of all four matrices
    assert m.grads == 4 * adapters and m.optimizer == 8 * adapters + 4 * 2 * 4 * TINY.n_layer
    assert (acts.total, acts.weight_copies_saved) == (m.activations, m.weight_copies)
    flops = next(row for row in compare(s, m) if row["name"].startswith("FLOPs"))
    assert flops["predicted"] == flops["measured"]  # frozen head and base, adapters, recompute: exact


@pytest.mark.parametrize("targets", [("attn.c_proj", "mlp.c_fc"), ("mlp.c_fc",), ("mlp.c_proj",)])
def test_lora_without_c_attn_block_0_saves_only_after_its_first_adapter(targets):
    s = PlanSetup(TINY, seq_len=64, micro_batch=2, precision="fp32", lora_r=8, lora_targets=targets, device="cpu")
    m, acts = measure_step(s), plan_activations(s)
    assert acts.total == m.activations  # exact: which tensors need a gradient in block 0
    flops = next(row for row in compare(s, m) if row["name"].startswith("FLOPs"))
    assert flops["predicted"] == flops["measured"]


@pytest.mark.parametrize(
    "precision, label_fraction, lora_r",
    [("fp32", 0.5, 0), ("bf16", 0.5, 0), ("fp32", 0.25, 0), ("fp32", 0.75, 0), ("fp32", 0.5, 8)],
)
def test_packed_step_with_the_last_block_cut_to_the_labels_is_exact(precision, label_fraction, lora_r):
    """Packed rows on CPU: the last block computes queries, MLP and LayerNorms on the label spans
    only (spans starting mid-document attend through a mask). The plan counts exactly what the
    step saves, and the FLOPs the counter sees."""
    s = PlanSetup(TINY, seq_len=64, micro_batch=2, precision=precision, packed=True, device="cpu")
    s = s.with_(label_fraction=label_fraction, lora_r=lora_r)
    assert s.last_block_cut and s.last_block_rows == s.label_tokens
    m, acts = measure_step(s), plan_activations(s)
    assert acts.total - acts.saved[LOSS_CHUNKED] == m.activations_model
    assert acts.saved[LOSS_CHUNKED] == m.activations_loss
    assert acts.weight_copies_saved == m.weight_copies
    flops = next(row for row in compare(s, m) if row["name"].startswith("FLOPs"))
    assert flops["predicted"] == flops["measured"]


@pytest.mark.parametrize("lora_r", [0, 8])
def test_packed_bf16_math_kernel_keeps_fp32_copies_of_the_spans(lora_r):
    """`--attention math` on packed rows in bf16: the cut last block's spans attend by CPU's math
    kernel, which upcasts each span's q, k, v to fp32 and saves those copies, no output. The plan
    counted the bf16 q, k, v of every token and an output instead (16 KiB over at this shape)."""
    s = PlanSetup(TINY, seq_len=64, micro_batch=2, precision="bf16", packed=True, device="cpu", attention="math")
    s = s.with_(lora_r=lora_r)
    m, acts = measure_step(s, count_flops=False), plan_activations(s)
    assert acts.total - acts.saved[LOSS_CHUNKED] == m.activations_model
    assert acts.weight_copies_saved == m.weight_copies
