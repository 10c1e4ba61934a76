"""A tiny model of each family for the equivalence tests that hold for any model: GPT-2 (tied head,
learned positions) and a Llama with grouped-query attention (4 query / 2 key-value heads, rotary,
RMSNorm, SwiGLU) and an untied head, so that a method's code that assumed GPT-2 (`wte`, a tied head)
fails on the second. Random norm gains too, so that a norm skipped or misplaced shows."""

from __future__ import annotations

import torch

from qatune.model.attention import DecoderLM
from qatune.model.gpt2 import GPT2, GPT2Config
from qatune.model.llama import Llama, LlamaConfig

FAMILIES = ("gpt2", "llama")


def tiny_lm(family: str, vocab_size: int = 97, n_positions: int = 128, n_embd: int = 32, seed: int = 0) -> DecoderLM:
    """A random 2-layer model of `family` (`FAMILIES`), built after seeding with `seed`."""
    torch.manual_seed(seed)
    if family == "gpt2":
        return GPT2(GPT2Config(n_layer=2, n_embd=n_embd, n_head=4, n_positions=n_positions, vocab_size=vocab_size))
    config = LlamaConfig(
        n_layer=2,
        n_embd=n_embd,
        n_head=4,
        n_kv_head=2,
        head_dim=n_embd // 4,
        d_ff=48,
        n_positions=n_positions,
        vocab_size=vocab_size,
        eos_token_id=vocab_size - 1,  # GPT-2's convention: EOS is the last id
    )
    return randomize_norms_and_biases(Llama(config))


def randomize_norms_and_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Norm gains ~ N(1, 0.2) and biases ~ N(0, 0.2) instead of ones and zeros, so that a norm or
    bias skipped, misplaced or mapped to the wrong tensor cannot hide behind its initial value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model


def hf_llama_shape(vocab_size: int, max_positions: int = 128, **extra) -> dict:
    """The transformers config arguments of the tests' tiny Llama-family folders: 2 layers, d=64,
    4 query / 2 key-value heads (grouped-query attention), d_ff 96; `extra` adds or overrides."""
    shape = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
    )
    return {**shape, **extra}
