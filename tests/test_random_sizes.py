"""Random init of the named sizes of both families (`model: {name: smollm2-135m, init: random}`):
the published shape and parameter count, shape overrides, SFT on a random Llama, and the
benchmark's cut tokenizer and FLOP count at the sizes it runs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from qatune.errors import UserError
from qatune.methods.config import TrainConfig
from qatune.model.llama import Llama
from qatune.model.llama_hf_io import config_to_hf, export_hf
from qatune.train.config import ModelConfig
from qatune.train.runtime import make_model


def test_smollm2_random_init_has_the_published_shape_and_parameter_count():
    with torch.device("meta"):  # the shapes, not 135M random numbers
        model = make_model(ModelConfig(name="smollm2-135m", init="random"), 49152)
        reference = LlamaForCausalLM(HFLlamaConfig(**config_to_hf(model.config)))
    c = model.config
    assert isinstance(model, Llama) and len(model.layers) == 30
    assert (c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.d_ff, c.vocab_size) == (576, 9, 3, 64, 1536, 49152)
    assert c.tie_embeddings and model.output is None and model.head_weight is model.embed_tokens.weight
    assert model.num_parameters() == reference.num_parameters() == 134_515_008  # SmolLM2-135M's own count


def test_shape_overrides_make_the_same_architecture_smaller(tmp_path):
    """n_layer/n_embd/n_head/n_kv_head apply; head_dim follows n_embd / n_head, d_ff keeps the
    size's ratio; transformers builds the same model from the exported folder (equal logits)."""
    cfg = ModelConfig(name="smollm2-135m", init="random", n_layer=2, n_embd=96, n_head=6, n_kv_head=2)
    torch.manual_seed(0)
    model = make_model(cfg, 300).eval()
    c = model.config
    assert (len(model.layers), c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.d_ff) == (2, 96, 6, 2, 16, 256)
    assert c.vocab_size == 300 and c.rope.theta == 100000.0 and c.tie_embeddings
    ours = {k: v.shape for k, v in model.state_dict().items()}
    reference = LlamaForCausalLM(HFLlamaConfig(**config_to_hf(c)))
    assert model.num_parameters() == reference.num_parameters()
    export_hf(model, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[5, 17, 250, 3, 99, 42]])
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model(ids)), hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(ours) == len(hf.state_dict()) - 1  # tied: lm_head.weight is the embedding


def test_bad_random_init_names_say_what_is_allowed():
    with pytest.raises(UserError, match="smollm2-135m"):
        make_model(ModelConfig(name="llama-9000", init="random"), 100)
    with pytest.raises(UserError, match="n_kv_head applies to Llama-family sizes"):
        make_model(ModelConfig(name="gpt2", init="random", n_layer=1, n_kv_head=2), 100)
    with pytest.raises(UserError, match="n_embd=100 is not divisible by n_head=9"):
        make_model(ModelConfig(name="smollm2-135m", init="random", n_layer=1, n_embd=100), 100)
    with pytest.raises(UserError, match="n_head=4 is not divisible by n_kv_head=3"):
        make_model(ModelConfig(name="smollm2-135m", init="random", n_layer=1, n_embd=64, n_head=4), 100)


def test_sft_trains_a_random_llama_size_through_the_config(tmp_path, tokenizer_dir):
    """The documented config keys end to end: `launch.train` builds the random Llama and SFT
    lowers its loss (the head is the tied embedding: `head_weight`, not GPT-2's `wte`)."""
    from qatune.config import from_dict
    from qatune.launch import train

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a} plus 1?", "answer": str(a + 1)}) + "\n" for a in range(24)))
    model = {"name": "smollm2-135m", "init": "random", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2}
    cfg = from_dict(
        TrainConfig,
        {
            "name": "llama",
            "out_dir": str(tmp_path / "runs"),
            "tokenizer": str(tokenizer_dir),
            "model": model | {"n_positions": 128},
            "data": {"sources": [str(data)], "max_len": 64},
            "batch": {"size": 4},
            "optim": {"lr": 3e-3, "warmup_steps": 0},
            "max_steps": 8,
            "threads": 1,
            "eval": {"fraction": 0.0},
            "export": False,
            "plots": False,
            "tensorboard": False,
        },
    )
    result = train(cfg, progress=False)
    losses = [r["loss"] for r in result.history]
    assert result.steps == 8 and losses[-1] < losses[0] - 1.0, losses


def test_benchmark_tokenizer_cut_to_smollm2s_vocabulary(tmp_path, gpt2_tokenizer):
    """49,152 tokens, EOS last; text made of kept tokens encodes exactly as GPT-2 encodes it."""
    from benchmarks.sft_vs_trl import SMOLLM2_VOCAB, trimmed_tokenizer

    from qatune.model.tokenizer import load_tokenizer

    trimmed_tokenizer(SMOLLM2_VOCAB, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert len(tok) == 49152 and tok.eos_token_id == 49151 and tok.convert_ids_to_tokens(49151) == "<|endoftext|>"
    text = "Question: What is the capital of France?\nAnswer: Paris, the largest city.<|endoftext|>"
    gpt2_ids = gpt2_tokenizer(text)["input_ids"]
    assert max(gpt2_ids[:-1]) < 49151  # common words: all kept
    assert tok(text)["input_ids"] == gpt2_ids[:-1] + [49151]
    assert gpt2_tokenizer(" Leilan")["input_ids"] == [50216]  # a token past the cut
    rare = tok(" Leilan")["input_ids"]  # spelled with the kept tokens instead
    assert max(rare) < 49151 and len(rare) > 1 and tok.decode(rare) == " Leilan"


def test_benchmark_flops_at_gpt2_shapes_are_the_12_d_squared_count():
    """The FLOP count generalised to Llama blocks gives GPT-2's 12 L d^2 formula back."""
    from benchmarks.sft_vs_trl import forward_flops

    L, d, V, T, n = 12, 768, 50257, 100, 30
    shape = {"L": L, "d": d, "vocab": V, "block": 12 * d * d, "kv": 2 * d * d, "width": d}
    f = forward_flops([T], [n], shape)
    assert f["blocks"] == 2 * d * d * (12 * L * T - 10 * (T - n))
    assert f["head"] == 2 * d * V * n
