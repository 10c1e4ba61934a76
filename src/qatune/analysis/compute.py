"""Compute plan: FLOPs per token and per step, split into dense matmuls, attention and LM head.

Counted as PyTorch's `torch.utils.flop_counter` counts: 2 FLOPs per multiply-add of a matmul, bias
adds and elementwise work (norms, GELU/SiLU, rotary, softmax) not counted. Per token, forward +
backward, written here for GPT-2 (the Llama family's shapes are in `analysis.shapes`: W = its
block matmul weights, d * (2 n_head + 2 n_kv_head) * head_dim + 3 d d_ff with GQA and SwiGLU, and
d_att = n_head * head_dim in place of d in the attention term):
- dense: 6 * 12*L*d^2 (the "6N" rule with N = the 12*L*d^2 weights of the block matmuls; biases
  and LayerNorm, 13*L*d more parameters, do no matmul work),
- attention: 12 * L * T * d: QK^T and AV are 2*T*d multiply-adds each per token and layer in
  forward, twice that in backward (per query head: grouped key/value heads save no work). This
  counts the full T x T square, as the counter does for the math kernel; a causal flash kernel
  skips the masked half of the tiles, so the work the GPU really does is about 6*L*T*d, while
  CUDA flash backward also recomputes QK^T (the counter's CUDA formula: 14*L*T*d). The T in it
  is the row width; packed rows attend per document (per-document SDPA on CPU, FlexAttention
  skipping masked tiles on GPU), so for them it is an upper bound: their work is the sum
  of n_doc^2 over each row's documents, not T^2.
- LM head: 6 * V * d per *labelled* token with our chunked loss (2 forward + 4 backward, all
  done in the loss's forward), per token with full logits; tied or not, the same matmuls.
LoRA (frozen base, checked exactly against the counter): a frozen matmul needs no weight
gradient, so its backward is one matmul (4 per weight per token, not 6); in block 0 the matmuls up
to the first adapted one read inputs computed from the frozen embeddings alone, which need no
gradient (forward only, 2), and its attention backward runs only the matmuls the gradients of
adapted q, k or v need (none without an adapter on c_attn / q_proj, k_proj, v_proj). The tied
head, frozen too, costs 4 * V * d per labelled token. Each adapter's A and B cost 6 * r * (in + out)
per token like any trained matmul (the adapted matrices of block 0 whose input needs no gradient
need none through A either: 2 * r * in less each). Under checkpointing the
recompute reruns the adapters' forward too, and with mlp.c_proj (down_proj) adapted it cannot
stop before that matmul (its adapter saves A's output, computed after it): 24*L*d^2, less B's
last product. The Llama family: the same rules over its seven matrices (`shapes.lora_matmuls`).
Activation checkpointing recomputes each block's forward once, up to the last tensor backward
needs (PyTorch's non-reentrant checkpoint stops early: the MLP's output projection is not rerun):
+ 16*L*d^2 + 4*L*T*d per token (Llama family: every block matmul but down_proj, twice) (hardware
FLOPs; MFU is quoted on model FLOPs, without the recompute, the PaLM convention).

Note: the PyTorch FLOP counter has no formula for CPU's flash-attention op
(`_scaled_dot_product_flash_attention_for_cpu`), so on CPU it reports attention as 0 unless SDPA
runs its math kernel; `measure` states which it compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qatune.analysis.accelerators import Accelerator, peak_tflops
from qatune.analysis.setup import PlanSetup
from qatune.analysis.shapes import (
    attention_backward_matmuls_in_block_0,
    attention_width,
    block_matmul_weights,
    block_matmuls,
    input_needs_grad_in_block_0,
    lora_matmuls,
    recomputed_matmuls,
)
from qatune.analysis.shapes import every_token_matmuls as kv_matmuls
from qatune.errors import UserError

if TYPE_CHECKING:
    from qatune.model.info import ModelConfig


def dense_flops_per_token(c: ModelConfig) -> int:
    return 6 * c.n_layer * block_matmul_weights(c)


def attention_flops_per_token(c: ModelConfig, seq_len: int) -> int:
    return 12 * c.n_layer * seq_len * attention_width(c)


def head_flops_per_token(c: ModelConfig) -> int:
    return 6 * c.vocab_size * c.n_embd


def recompute_flops_per_token(c: ModelConfig, seq_len: int) -> int:
    """Checkpointing's rerun forward: the block matmuls but the last, and the attention."""
    shapes = block_matmuls(c)
    dense = 2 * sum(shapes[t][0] * shapes[t][1] for t in recomputed_matmuls(c))
    return c.n_layer * (dense + 4 * seq_len * attention_width(c))


@dataclass
class ComputePlan:
    setup: PlanSetup
    dense: int  # per micro-batch, forward + backward
    attention: int
    lm_head: int
    recompute: int  # checkpointing's extra forward (hardware FLOPs only)

    @property
    def model_flops(self) -> int:
        """Per micro-batch; the MFU numerator."""
        return self.dense + self.attention + self.lm_head

    @property
    def hardware_flops(self) -> int:
        return self.model_flops + self.recompute

    @property
    def per_token(self) -> float:
        return self.model_flops / self.setup.tokens

    @property
    def attention_share(self) -> float:
        return self.attention / self.model_flops


def plan_compute(s: PlanSetup) -> ComputePlan:
    c, tokens = s.config, s.tokens
    head_tokens = s.label_tokens if s.loss == "chunked" else tokens
    # Recompute stops early once the last saved tensor is back, so mlp.c_proj (8*d^2) is not rerun.
    recompute = recompute_flops_per_token(c, s.seq_len) * tokens if s.checkpointing else 0
    dense = dense_flops_per_token(c) * tokens
    head = head_flops_per_token(c) * head_tokens
    if s.lora_r:
        dense, head = lora_dense_flops_per_token(s) * tokens, 4 * c.vocab_size * c.n_embd * head_tokens
        if s.checkpointing:
            recompute = (lora_recompute_flops_per_token(s) + 4 * c.n_layer * s.seq_len * attention_width(c)) * tokens
    attention = attention_flops_per_token(c, s.seq_len) * tokens
    if s.lora_r:  # block 0's attention backward computes only the gradients its adapters need
        unused = 4 - attention_backward_matmuls_in_block_0(c, set(lora_matmuls(c, s.lora_targets)))
        attention -= unused * 2 * s.seq_len * attention_width(c) * tokens
    if s.last_block_cut:  # the positions outside the label spans skip most of the last block
        skipped = tokens - s.last_block_rows
        cut_dense, cut_recompute = last_block_cut_flops_per_row(s)
        dense -= cut_dense * skipped
        recompute -= cut_recompute * skipped if s.checkpointing else 0
        attention -= attention_flops_per_token(c, s.seq_len) // c.n_layer * skipped  # no queries there
    return ComputePlan(s, dense, attention, head, recompute)


def last_block_cut_flops_per_row(s: PlanSetup) -> tuple[int, int]:
    """(forward + backward, checkpointing's recompute) FLOPs of the last block at one position
    outside the label spans, which `LastBlockRows` does not compute: every block matmul but the
    keys' and values' (GPT-2: attn.c_proj, mlp.c_fc and mlp.c_proj; c_attn still runs on every
    token; the Llama family also skips q_proj there) and their adapters.
    Trained matmuls cost 6 per weight, frozen ones 4 (no weight gradient); the recompute reruns
    their forward (2) up to the last saved tensor (see plan_compute and the module docstring)."""
    r = s.lora_r
    shapes = block_matmuls(s.config)
    rows = tuple(t for t in shapes if t not in kv_matmuls(s.config))
    per_weight = 4 if s.lora_r else 6
    dense = per_weight * sum(shapes[t][0] * shapes[t][1] for t in rows)
    adapted = lora_matmuls(s.config, s.lora_targets) if r else {}
    adapters = [t for t in rows if t in adapted]
    dense += 6 * r * sum(sum(shapes[t]) for t in adapters)
    recompute = 2 * sum(shapes[t][0] * shapes[t][1] for t in rows if t in recomputed_matmuls(s.config))
    if r:
        recompute += 2 * r * sum(sum(shapes[t]) for t in adapters)
        recompute += _last_matmul_rerun(s.config, adapted, r)
    return dense, recompute


def _last_matmul_rerun(c, adapted: dict[str, tuple[int, int]], r: int) -> int:
    """Per position: an adapted last block matmul (mlp.c_proj, down_proj) has its A's output saved,
    so the recompute runs through it and its A; B's product is not needed."""
    last = tuple(block_matmuls(c))[-1]
    if last not in adapted:
        return 0
    fan_in, fan_out = adapted[last]
    return 2 * fan_in * fan_out - 2 * r * fan_out


def lora_dense_flops_per_token(s: PlanSetup) -> int:
    """Block matmuls and adapters under LoRA, forward + backward (see the module docstring): a
    frozen matmul costs 4 per weight (no weight gradient), an adapter 6 per weight of A and B; in
    block 0 a matmul whose input depends on no adapter computes no input gradient either (2)."""
    c, r = s.config, s.lora_r
    adapted = lora_matmuls(c, s.lora_targets)
    fans = sum(sum(f) for f in adapted.values())
    total = 4 * c.n_layer * block_matmul_weights(c) + 6 * r * c.n_layer * fans
    needs = input_needs_grad_in_block_0(c, set(adapted))
    for name, (fan_in, fan_out) in block_matmuls(c).items():
        if not needs[name]:
            total -= 2 * fan_in * fan_out + (2 * r * fan_in if name in adapted else 0)
    return total


def lora_recompute_flops_per_token(s: PlanSetup) -> int:
    """Block matmuls and adapters rerun by checkpointing under LoRA (attention not included)."""
    c, r = s.config, s.lora_r
    shapes, adapted = block_matmuls(c), lora_matmuls(c, s.lora_targets)
    adapters = 2 * r * c.n_layer * sum(sum(f) for f in adapted.values())
    rerun = 2 * sum(shapes[t][0] * shapes[t][1] for t in recomputed_matmuls(c))
    return c.n_layer * (rerun + _last_matmul_rerun(c, adapted, r)) + adapters


@dataclass
class StepTime:
    accelerator: str
    peak_tflops: float
    mfu: float
    seconds: float  # one optimizer step (all micro-batches) on one rank
    tokens_per_second: float  # all ranks


def step_time(s: PlanSetup, acc: Accelerator, mfu: float) -> StepTime:
    """Step time at a stated MFU: model FLOPs / (peak x MFU), plus the recompute at the same rate.
    Communication (DDP all-reduce, FSDP gathers) is assumed overlapped; offload is not modelled."""
    if not 0 < mfu <= 1:
        raise UserError(f"MFU {mfu} is outside (0, 1]")
    plan = plan_compute(s)
    peak = peak_tflops(acc, s.precision)
    seconds = plan.hardware_flops * s.accum / (peak * 1e12 * mfu)
    tokens = s.tokens * s.accum * s.gpus
    return StepTime(acc.key, peak, mfu, seconds, tokens / seconds)


def seq_len_table(config: ModelConfig, seq_lens=(256, 512, 1024), label_fraction: float = 0.5) -> list[dict]:
    """Per-token FLOPs at several T, the attention share, and the per-sequence cost factor from one
    T to the next: the O(L*T^2*d) attention term alone would make 512 -> 1024 4x; the dense part grows
    only as T, so the whole grows less."""
    rows = []
    for i, T in enumerate(seq_lens):
        dense = dense_flops_per_token(config)
        attention = attention_flops_per_token(config, T)
        head = head_flops_per_token(config) * label_fraction
        total = dense + attention + head
        row = {
            "seq_len": T,
            "dense": dense,
            "attention": attention,
            "lm_head": head,
            "total": total,
            "attention_share": attention / total,
            "per_sequence": total * T,
        }
        if i:
            prev = rows[-1]
            row["per_token_factor"] = total / prev["total"]
            row["per_sequence_factor"] = row["per_sequence"] / prev["per_sequence"]
        rows.append(row)
    return rows
