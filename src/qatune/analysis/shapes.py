"""What each family's block computes, as shapes: the matmuls the compute and memory plans count.

GPT-2: c_attn (d -> 3d), c_proj (d -> d), c_fc (d -> 4d), c_proj (4d -> d). The Llama family:
grouped-query attention projects the queries to n_head * head_dim and keys and values to
n_kv_head * head_dim each (head_dim is not always d / n_head: Qwen3), and its SwiGLU MLP has
three d x d_ff matrices (gate, up, down) where GPT-2 has two of d x 4d.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import, as analysis.setup
    from qatune.model.gpt2 import GPT2Config
    from qatune.model.llama import LlamaConfig


def is_gpt2(c: GPT2Config | LlamaConfig) -> bool:
    return not hasattr(c, "model_type")


def block_matmuls(c: GPT2Config | LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each block matmul, by its name inside the block, in the order the forward runs them."""
    d = c.n_embd
    if is_gpt2(c):
        return {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    return {
        "self_attn.q_proj": (d, q),
        "self_attn.k_proj": (d, kv),
        "self_attn.v_proj": (d, kv),
        "self_attn.o_proj": (q, d),
        "mlp.gate_proj": (d, c.d_ff),
        "mlp.up_proj": (d, c.d_ff),
        "mlp.down_proj": (c.d_ff, d),
    }


def block_matmul_weights(c: GPT2Config | LlamaConfig) -> int:
    """Weights of one block's matmuls: 12 d^2 for GPT-2; with GQA and SwiGLU
    d * (2 n_head + 2 n_kv_head) * head_dim + 3 d d_ff."""
    return sum(fan_in * fan_out for fan_in, fan_out in block_matmuls(c).values())


def attention_width(c: GPT2Config | LlamaConfig) -> int:
    """n_head * head_dim: the width of the queries and of the attention output (d for GPT-2).
    QK^T and AV run per query head, whatever the number of key/value heads."""
    return c.n_head * c.head_dim


def every_token_matmuls(c: GPT2Config | LlamaConfig) -> tuple[str, ...]:
    """The matmuls the last block still runs on every token when it is cut to the label rows
    (`LastBlockRows`): the keys and values later rows read. GPT-2's c_attn makes q, k and v in one."""
    return ("attn.c_attn",) if is_gpt2(c) else ("self_attn.k_proj", "self_attn.v_proj")


def recomputed_matmuls(c: GPT2Config | LlamaConfig) -> tuple[str, ...]:
    """The block matmuls activation checkpointing reruns: all but the last, whose output no
    backward reads (PyTorch's non-reentrant checkpoint stops once the last saved tensor is back)."""
    return tuple(block_matmuls(c))[:-1]
