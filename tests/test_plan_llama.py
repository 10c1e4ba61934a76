"""`qatune info`, `qatune plan` and `qatune grads` for the Llama family (Llama, Qwen2, Qwen3,
Mistral): parameter counts equal to the real model's and transformers', FLOPs equal to PyTorch's
FLOP counter on the real step (GQA, SwiGLU, untied head, Qwen3's head_dim), activations equal to
what autograd saves, and `plan --measure`'s peak within the tolerance the GPT-2 path holds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tests.test_llama import CASES, hf_dirs  # noqa: F401 (the fixture)
from tests.tiny_models import hf_llama_shape
from tests.tolerances import assert_plan_measure_holds

from qatune.analysis.activations import LOSS_CHUNKED, plan_activations
from qatune.analysis.compute import attention_flops_per_token, dense_flops_per_token, plan_compute
from qatune.analysis.measure import compare, measure_step
from qatune.analysis.memory import advice, model_state
from qatune.analysis.setup import PlanSetup
from qatune.cli import main
from qatune.model.families import from_pretrained
from qatune.model.llama import SIZES, LlamaConfig

GQA = LlamaConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, d_ff=96, n_positions=256, vocab_size=256)
# untied GQA; Qwen3 (q/k norms, head_dim 32 with d=64 and 4 heads); Qwen2 (q/k/v bias, tied)
CONFIGS = {
    "llama": GQA,
    "qwen3": replace(GQA, model_type="qwen3", qk_norm=True, head_dim=32),
    "qwen2": replace(GQA, model_type="qwen2", qkv_bias=True, tie_embeddings=True),
}
# (precision, checkpointing, packed, attention): packed rows on CPU also cut the last block to the labels
SETTINGS = [
    ("fp32", False, False, "flash"),
    ("bf16", False, False, "flash"),
    ("fp32", False, True, "flash"),
    ("bf16", False, True, "flash"),
    ("fp32", True, False, "math"),
    ("bf16", True, True, "flash"),
    ("fp32", False, False, "math"),
    ("bf16", False, True, "math"),
]


def info_json(capsys, model: str) -> dict:
    assert main(["info", model, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("case", list(CASES))
def test_info_counts_equal_the_model_and_transformers(capsys, hf_dirs, case):  # noqa: F811
    from transformers import AutoModelForCausalLM

    folder = hf_dirs(case)
    info = info_json(capsys, str(folder))
    theirs = AutoModelForCausalLM.from_pretrained(folder).num_parameters()
    assert info["parameters"]["total"] == from_pretrained(folder).num_parameters() == theirs
    assert info["model_type"] == json.loads((folder / "config.json").read_text())["model_type"]
    assert (info["n_head"], info["n_kv_head"]) == (4, 2)
    untied = not info["tied_head"]
    assert ("lm_head" in info["parameters"]) == untied
    if untied:
        assert info["parameters"]["lm_head"] == 256 * 64


def test_info_of_a_named_llama_size(capsys):
    assert main(["info", "smollm2-135m"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("smollm2-135m (llama, tied head)")
    assert "kv heads                   3" in text and "134,515,008" in text and "lm_head" not in text


def test_flops_formula_for_gqa_and_swiglu():
    """SmolLM2-135M: q and o are d x 9*64, k and v d x 3*64 (GQA), three d x d_ff SwiGLU matrices."""
    c, d = SIZES["smollm2-135m"], 576
    assert dense_flops_per_token(c) == 6 * 30 * (d * (2 * 9 + 2 * 3) * 64 + 3 * d * 1536)
    assert attention_flops_per_token(c, 1024) == 12 * 30 * 1024 * 9 * 64
    qwen3 = CONFIGS["qwen3"]  # attention runs over n_head * head_dim = 128, not d = 64
    assert attention_flops_per_token(qwen3, 64) == 12 * 2 * 64 * 128


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_flops_equal_the_flop_counter_on_the_real_step(name, checkpointing):
    """The math kernel shows the counter every matmul: block matmuls, attention, head, recompute."""
    s = PlanSetup(CONFIGS[name], seq_len=48, micro_batch=2, precision="fp32", attention="math", device="cpu")
    s = s.with_(checkpointing=checkpointing, label_fraction=0.3)
    m = measure_step(s)
    assert m.attention_counted == "math"
    assert plan_compute(s).hardware_flops == m.flops


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_of_packed_rows_with_the_last_block_cut(name):
    """Packed rows on CPU: the last block runs q_proj, o_proj and the MLP on the label spans only."""
    s = PlanSetup(CONFIGS[name], seq_len=64, micro_batch=2, precision="fp32", packed=True, device="cpu")
    assert s.last_block_cut
    m = measure_step(s)
    flops = next(row for row in compare(s, m) if row["name"].startswith("FLOPs"))
    assert flops["predicted"] == flops["measured"]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda t: "-".join(map(str, t)))
def test_state_and_activations_equal_the_real_step(name, setting):
    precision, checkpointing, packed, attention = setting
    s = PlanSetup(CONFIGS[name], seq_len=64, micro_batch=2, precision=precision, device="cpu")
    s = s.with_(checkpointing=checkpointing, packed=packed, attention=attention)
    m, st, acts = measure_step(s, count_flops=False), model_state(s), plan_activations(s)
    assert (st.weights, st.grads, st.optimizer) == (m.params, m.grads, m.optimizer)
    assert acts.total - acts.saved[LOSS_CHUNKED] == m.activations_model
    assert acts.saved[LOSS_CHUNKED] == m.activations_loss
    assert acts.weight_copies_saved == m.weight_copies


def test_long_sliding_windows_are_refused():
    with pytest.raises(ValueError, match="sliding window of 64"):
        PlanSetup(replace(GQA, sliding_window=64), seq_len=128)


def test_advice_for_a_llama_model_tries_no_lora():
    lines = advice(PlanSetup(SIZES["smollm2-135m"], seq_len=2048, micro_batch=4), 10**9, "1 GB")
    assert lines[0].startswith("does not fit in 1 GB") and lines[-1].startswith("does not fit even with")
    assert "LoRA" not in lines[-1] and "ZeRO-3 on 8 GPUs" in lines[-1]


def test_plan_of_a_named_llama_size(capsys):
    assert main(["plan", "--model", "smollm2-135m", "--seq-len", "2048", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["state"]["params"] == 134_515_008
    assert out["compute"]["dense"] == dense_flops_per_token(SIZES["smollm2-135m"]) * 2048
    assert not out["corrections"]  # the GPT-2 figures are not this model's
    assert main(["plan", "--model", "smollm2-135m", "--seq-len", "2048"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("smollm2-135m: L=30 d=576 h=9 kv=3 hd=64 ff=1536 V=49152, 134.5M parameters")
    assert "rotary cos, sin" in text and "final RMSNorm" in text and "Figures often misquoted" not in text


@pytest.fixture(scope="module")
def llama_50k_dir(tmp_path_factory):
    """A transformers-written Llama with GPT-2's vocabulary size (the GPT-2 tokenizer's ids fit):
    untied head, grouped-query attention; the embeddings dominate its state, as at real sizes."""
    import transformers

    config = transformers.LlamaConfig(**hf_llama_shape(50257, 256, tie_word_embeddings=False))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama50k")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_measure_a_llama_folder_holds_the_gpt2_tolerance(capsys, llama_50k_dir, precision):
    """`plan --measure` as docs/plan.md prints it, on a Llama folder: exact state and
    activations, FLOPs within 2%, and the fresh process's peak within 10% + 6 MiB (the GPT-2
    path's tolerance, `tests.tolerances.assert_plan_measure_holds`)."""
    args = ["plan", "--model", str(llama_50k_dir), "--seq-len", "64", "--micro-batch", "2", "--precision", precision]
    assert main([*args, "--measure", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert_plan_measure_holds(out)
    block = 64 * (4 + 2 + 2 + 4) * 16 + 3 * 64 * 96 + 2 * 64  # q, k, v, o; gate, up, down; two norms
    assert out["measurement"]["params"] == 4 * (2 * 50257 * 64 + 2 * block + 64)  # untied: embedding + head


@pytest.mark.slow
def test_grads_on_a_llama_checkpoint(llama_50k_dir, tokenizer_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "grads"
    argv = ["grads", str(llama_50k_dir), str(data_dir / "gsm8k" / "test.jsonl"), "--n", "8", "--segments-n", "3"]
    argv += ["--bins", "0", "--max-len", "128", "--tokenizer", str(tokenizer_dir), "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "grads.json").read_text())
    assert [r["layer"] for r in result["layers"]] == ["embeddings", "layers.0", "layers.1", "norm", "output"]
    assert all(r["grad_norm"] > 0 and r["update_norm"] > 0 for r in result["layers"])
    pe = result["per_example"]
    assert pe["n_examples"] == 8
    for s, m, n in zip(pe["sum"]["sq_norm"], pe["mean"]["sq_norm"], pe["response_len"]):
        assert m == pytest.approx(s / n**2)
    assert "noise scale" in capsys.readouterr().out
