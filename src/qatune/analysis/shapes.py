"""What each family's block computes, as shapes: the matmuls the compute and memory plans count.

GPT-2: c_attn (d -> 3d), c_proj (d -> d), c_fc (d -> 4d), c_proj (4d -> d). The Llama family:
grouped-query attention projects the queries to n_head * head_dim and keys and values to
n_kv_head * head_dim each (head_dim is not always d / n_head: Qwen3), and its SwiGLU MLP has
three d x d_ff matrices (gate, up, down) where GPT-2 has two of d x 4d.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qatune.model.names import LLAMA_LORA_TARGETS, LORA_TARGETS

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


def lora_targets(c: GPT2Config | LlamaConfig) -> tuple[str, ...]:
    """The matrices LoRA can adapt, by the names `lora.targets` takes: GPT-2's four by their names
    in the block, the Llama family's seven by peft's (q_proj ... down_proj). Also `model.lora`'s
    default: all of the family's."""
    return LORA_TARGETS if is_gpt2(c) else tuple(LLAMA_LORA_TARGETS)


def lora_matmul(c: GPT2Config | LlamaConfig, target: str) -> str:
    """The block matmul (a `block_matmuls` name) a LoRA target adapts: "q_proj" -> "self_attn.q_proj"."""
    if target not in lora_targets(c):
        family = "GPT-2" if is_gpt2(c) else "Llama-family"
        raise ValueError(f"{target!r} is not a {family} LoRA target; they are {', '.join(lora_targets(c))}")
    return target if is_gpt2(c) else LLAMA_LORA_TARGETS[target]


def lora_matmuls(c: GPT2Config | LlamaConfig, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(in, out) of each adapted matmul, by its `block_matmuls` name, in forward order."""
    adapted = {lora_matmul(c, t) for t in targets}
    return {name: fans for name, fans in block_matmuls(c).items() if name in adapted}


def matmul_stages(c: GPT2Config | LlamaConfig) -> tuple[tuple[str, ...], ...]:
    """The block matmuls grouped by the input they read, in forward order: GPT-2's c_attn,
    attn.c_proj, c_fc, mlp.c_proj one each; the Llama family's q/k/v (one normed input), o, gate/up
    (one normed input), down."""
    if is_gpt2(c):
        return tuple((name,) for name in block_matmuls(c))
    attn, mlp = "self_attn.", "mlp."
    return (
        (attn + "q_proj", attn + "k_proj", attn + "v_proj"),
        (attn + "o_proj",),
        (mlp + "gate_proj", mlp + "up_proj"),
        (mlp + "down_proj",),
    )


def input_needs_grad_in_block_0(c: GPT2Config | LlamaConfig, adapted: set[str]) -> dict[str, bool]:
    """Under LoRA, block 0 reads the frozen embeddings: a matmul's input there needs a gradient only
    when it depends on an adapter of an earlier stage (matmuls of one stage read the same input)."""
    out, seen = {}, False
    for stage in matmul_stages(c):
        out.update(dict.fromkeys(stage, seen))
        seen = seen or any(name in adapted for name in stage)
    return out


def attention_backward_matmuls_in_block_0(c: GPT2Config | LlamaConfig, adapted: set[str]) -> int:
    """Of attention's four backward matmuls (dP = dO V^T, dQ = dS K, dK = dS^T Q, dV = P^T dO),
    how many block 0 runs under LoRA: its q, k and v come from the frozen embeddings, so each
    needs a gradient only when its own projection is adapted (GPT-2's c_attn makes all three), and
    dP only for dQ or dK (measured with the flop counter on the math kernel)."""
    if is_gpt2(c):
        q = k = v = "attn.c_attn" in adapted
    else:
        q, k, v = (f"self_attn.{name}" in adapted for name in ("q_proj", "k_proj", "v_proj"))
    return (q or k) + q + k + v
