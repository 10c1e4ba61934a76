"""`qatune plan --lora-r` on the Llama family: adapter shapes of the family's seven targets (peft's
names), the default being all of them as `model.lora` adapts by default; the planned trainable
parameters equal the real LoRA model's, and the planned FLOPs the flop counter's on the real step
(also GPT-2's without c_attn adapted: block 0's attention backward is skipped)."""

from __future__ import annotations

import json

import pytest
from tests.test_llama import CASES, hf_dirs  # noqa: F401  (the fixture: random folders written by transformers)
from tests.test_plan_llama import CONFIGS

from qatune.analysis.activations import LOSS_CHUNKED, plan_activations
from qatune.analysis.compute import plan_compute
from qatune.analysis.measure import measure_step
from qatune.analysis.memory import model_state
from qatune.analysis.setup import PlanSetup
from qatune.cli import main
from qatune.model.families import from_pretrained
from qatune.model.gpt2 import GPT2Config
from qatune.model.lora import LLAMA_LORA, LoRAConfig, apply_lora

TARGET_SETS = [None, ("q_proj", "v_proj"), ("v_proj", "down_proj"), ("gate_proj",)]


def trainable(model) -> tuple[int, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in params), len(params)


@pytest.mark.parametrize("case", ["llama", "llama-linear-rope-biases", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "default" if t is None else "+".join(t))
def test_planned_trainable_parameters_equal_the_real_lora_model(hf_dirs, case, targets):  # noqa: F811
    model = from_pretrained(hf_dirs(case))
    apply_lora(model, LoRAConfig(r=8, targets=list(targets) if targets else None))
    planned = model_state(PlanSetup(model.config, seq_len=64, lora_r=8, lora_targets=targets))
    assert (planned.trainable, planned.trainable_tensors) == trainable(model)


def test_the_default_targets_are_model_loras_default_for_the_family():
    assert PlanSetup(CONFIGS["llama"], seq_len=64, lora_r=8).lora_targets == tuple(LLAMA_LORA.resolve(None))
    with pytest.raises(ValueError, match="among this model's q_proj, k_proj"):
        PlanSetup(CONFIGS["llama"], seq_len=64, lora_r=8, lora_targets=("attn.c_attn",))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "default" if t is None else "+".join(t))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_flops_equal_the_flop_counter_on_the_real_step(name, targets, checkpointing):
    """Frozen matmuls without a weight gradient, block 0's matmuls before the first adapter without
    an input gradient, the recompute under checkpointing: every matmul the counter sees."""
    s = PlanSetup(CONFIGS[name], seq_len=48, micro_batch=2, precision="fp32", attention="math", device="cpu")
    s = s.with_(checkpointing=checkpointing, label_fraction=0.3, lora_r=4, lora_targets=targets)
    m = measure_step(s)
    assert plan_compute(s).hardware_flops == m.flops


@pytest.mark.parametrize("targets", [("mlp.c_fc",), ("attn.c_proj", "mlp.c_proj"), ("attn.c_attn",)], ids="+".join)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpt2_lora_flops_without_c_attn_skip_block_0s_attention_backward(targets, checkpointing):
    """The same rule on GPT-2: without an adapter on c_attn, block 0's q, k, v need no gradient."""
    c = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=256)
    s = PlanSetup(c, seq_len=48, micro_batch=2, precision="fp32", attention="math", device="cpu")
    s = s.with_(checkpointing=checkpointing, label_fraction=0.3, lora_r=4, lora_targets=targets)
    assert plan_compute(s).hardware_flops == measure_step(s).flops


def test_plan_of_smollm2_135m_with_lora(capsys):
    """peft's count for SmolLM2-135M at r=16 on all linears: 4,884,480 trainable parameters."""
    assert main(["plan", "--model", "smollm2-135m", "--lora-r", "16", "--seq-len", "2048", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["lora_targets"] == list(LLAMA_LORA.resolve(None))
    assert out["state"]["trainable"] == 4_884_480


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    "targets", [*TARGET_SETS, ("o_proj",), ("k_proj",)], ids=lambda t: "default" if t is None else "+".join(t)
)
@pytest.mark.parametrize(
    ("precision", "packed", "checkpointing", "attention"),
    [
        ("fp32", False, False, "flash"),
        ("bf16", False, False, "flash"),
        ("fp32", True, False, "flash"),
        ("bf16", True, False, "flash"),
        ("bf16", True, True, "flash"),
        ("fp32", False, False, "math"),
    ],
    ids=lambda v: str(v),
)
def test_state_activations_and_weight_copies_equal_the_real_lora_step(
    name, targets, precision, packed, checkpointing, attention
):
    """Everything the plan counts equals the real LoRA step's, to the byte: frozen matmuls save no
    input, frozen norms no normalized rows, each adapter its A's output; in block 0 (the frozen
    embeddings' block) only what lies after an adapter (q, k, v each only when adapted, and the
    math kernel then only what those gradients need); q/k/v and gate/up stacked under autocast
    where none of them is adapted; under autocast the frozen weights' 16-bit copies wherever their
    input needs a gradient (`WeightCasts` tells them from activations)."""
    s = PlanSetup(CONFIGS[name], seq_len=64, micro_batch=2, precision=precision, packed=packed, device="cpu")
    s = s.with_(lora_r=4, lora_targets=targets, checkpointing=checkpointing, attention=attention)
    m, st, acts = measure_step(s, count_flops=False), model_state(s), plan_activations(s)
    assert (st.weights, st.grads, st.optimizer) == (m.params, m.grads, m.optimizer)
    assert acts.total - acts.saved[LOSS_CHUNKED] == m.activations_model
    assert acts.saved[LOSS_CHUNKED] == m.activations_loss
    assert acts.weight_copies_saved == m.weight_copies
