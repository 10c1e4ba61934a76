"""Activation memory of our models (`qatune.model.gpt2`; the Llama family in its own section
below), from the tensors autograd really saves.

Measured with `torch.autograd.graph.saved_tensors_hooks` (storages deduplicated), torch 2.13, and
written here from the shapes. E = B*T positions, d = width, h = heads, V = vocabulary, N = label
positions; `a` = bytes of matmul activations, `r` = bytes of the residual stream (fp32 under
autocast: the residual adds promote to fp32), `s` = LayerNorm statistics (fp32 except pure 16-bit
on CPU). Per block, without checkpointing:

  ln_1 input (the block input)  E*d*r     ln_1 mean + rstd           2*E*s
  ln_1 output = c_attn input    E*d*a     qkv = c_attn output        3*E*d*a  (q, k, v are views)
  SDPA output = c_proj input    E*d*a     SDPA logsumexp (fp32)      B*h*T*4
  ln_2 input                    E*d*r     ln_2 mean + rstd           2*E*s
  ln_2 output = c_fc input      E*d*a     c_fc output = GELU input   4*E*d*a
  GELU output = c_proj input    4*E*d*a
  = E*d*(2r + 14a) + 4*E*s + 4*B*h*T

SDPA backends (what differs):
- flash (CPU's `_scaled_dot_product_flash_attention_for_cpu`; CUDA flash for bf16/fp16): saves q, k,
  v, the output (laid out (B, T, h, hd), so the transpose before c_proj is free) and an fp32
  logsumexp (B, h, T). No T x T tensor.
- packed rows (`doc_ids`): no T x T mask. On CPU the model drops the rows' padding and runs
  causal SDPA per document, then joins the documents' outputs: c_proj reads that joined tensor,
  one more E*d*a (the kernel saves per document what it saves per row). On GPU it runs
  FlexAttention with a block mask of a few ints per 128 x 128 tile; its output made contiguous is
  again one more E*d*a (assumed from the source, not measured here: no GPU).
- math (CPU fallback, e.g. dropout > 0): saves copies of q, k, v, the softmax probabilities
  B*h*T*T and a copy of the output: this is the O(T^2) activation. On CPU
  it upcasts 16-bit q, k, v to fp32 first, so q, k, v and the probabilities are fp32 there.

With activation checkpointing only each block's input is kept (E*d*r per layer); during backward
one block at a time is recomputed, so one block's saved set comes back on top. The autocast
weight copies are then not saved, but autocast's cache still holds them until the forward ends.

LoRA (frozen base): a frozen matmul saves no input (measured with frozen nn.Linear weights), so
a block saves the ln_1 / ln_2 outputs and the GELU output only where an adapter reads them, plus
each adapter's E x r intermediate; a frozen c_proj keeps no joined documents' output. Block 0
reads the frozen embeddings: there only what lies after its first adapter is saved (nothing for
ln_1; q, k, v only if c_attn is adapted …). Checked against `qatune.model.lora` adapters in
tests: exact in fp32 and bf16, packed or not, for every subset of targets tried.

Under autocast the 16-bit copies of the four matmul weights are saved too (12*d^2*a per layer):
weight-sized, not batch-sized, and reported on their own line. Dropout masks are not modelled
(qatune's fine-tuning default is dropout 0).

The loss: `response_loss_sum` keeps the N label positions (int64, gathered with `index_select` from
`Batch.label_index`: no device sync, unlike a bool mask), grad_h (N x d, dtype of h) and
grad_w (V x d, fp32), never a logits tensor; during its forward one chunk of logits lives at a time.
The "full logits" alternative (what `transformers` does) keeps B*T*V logits in the caller plus the
fp32 log-softmax that cross-entropy saves, and needs a logits-sized gradient in backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qatune.analysis.setup import LORA_TARGETS, PlanSetup
from qatune.analysis.shapes import (
    attention_width,
    block_matmul_weights,
    block_matmuls,
    input_needs_grad_in_block_0,
    is_gpt2,
    lora_matmuls,
)
from qatune.model.gpt2 import packed_attention_kernel

INDEX_BYTES = 8  # int64 token and position ids, saved by the two embedding lookups


@dataclass
class ActivationPlan:
    per_block: dict[str, int]  # what one block saves, without checkpointing
    saved: dict[str, int]  # what autograd holds at the end of forward, by component
    weight_copies: int  # autocast: 16-bit copies of matmul weights, alive at the end of forward
    weight_copies_saved: int  # of which saved for backward (none under checkpointing: only cached)
    recompute: int  # checkpointing: one block's saved set, re-created during backward
    loss_transient: int  # extra bytes alive only during the loss forward (one chunk of logits …)
    loss_backward: int  # extra bytes the loss's backward creates (the logits' gradient for full logits)

    @property
    def total(self) -> int:
        return sum(self.saved.values())


def _stat_bytes(s: PlanSetup) -> int:
    # LayerNorm keeps mean/rstd in the accumulation type: fp32, except CPU's 16-bit kernels.
    return 4 if (s.prec.residual == 4 or s.device == "cuda") else s.prec.residual


def _adapted(s: PlanSetup, name: str) -> bool:
    """Whether matmul `name` trains a weight of its own: every one in full fine-tuning, the
    adapted ones under LoRA."""
    return not s.lora_r or name in s.lora_targets


def _block_0_input_grads(s: PlanSetup) -> dict[str, bool]:
    """Under LoRA, per block matmul (`block_matmuls` names): does its input need a gradient in
    block 0, the frozen embeddings' block (`shapes.input_needs_grad_in_block_0`)?"""
    return input_needs_grad_in_block_0(s.config, set(lora_matmuls(s.config, s.lora_targets)))


def _round_up(n: int, k: int) -> int:
    return math.ceil(n / k) * k


def attention_saved(s: PlanSetup) -> dict[str, int]:
    """What SDPA saves. d is the query width n_head * head_dim and kv the key/value width
    n_kv_head * head_dim (both d for GPT-2): fused kernels save the grouped keys and values as they
    are (`enable_gqa`); the math kernel saves them expanded to every query head (measured)."""
    if s.packed:
        return _packed_attention_saved(s)
    B, T, c = s.micro_batch, s.seq_len, s.config
    E, d, kv, h, a = B * T, attention_width(c), c.n_kv_head * c.head_dim, c.n_head, s.prec.act
    if s.attention == "math":
        up = 4 if s.device == "cpu" else a  # CPU's math kernel upcasts 16-bit q, k, v to fp32
        return {"q, k, v": 3 * E * d * up, "softmax probabilities": B * h * T * T * up, "attention output": E * d * a}
    lse_rows = T if s.attention == "flash" else _round_up(T, 32)  # memory-efficient: padded to 32 queries
    return {"q, k, v": E * (d + 2 * kv) * a, "attention output": E * d * a, "logsumexp": B * h * lse_rows * 4}


def _packed_attention_saved(s: PlanSetup) -> dict[str, int]:
    """Packed rows attend within each document without a T x T mask (`packed_attention_kernel`):
    per-document SDPA on CPU, FlexAttention on GPU. Either way c_proj reads a new tensor (the
    documents' outputs joined / FlexAttention's output made contiguous): one more E x d. The
    plan's rows hold two documents of T/2 (as `measure`'s synthetic batch), which only the math
    kernel's probabilities depend on."""
    B, T, c = s.micro_batch, s.seq_len, s.config
    E, d, kv, h, a = B * T, attention_width(c), c.n_kv_head * c.head_dim, c.n_head, s.prec.act
    joined = {"attention output, joined (c_proj input)": E * d * a}
    if packed_attention_kernel(s.device) == "documents" and s.device == "cpu" and s.prec.act == 2:
        # 16-bit on CPU: the matmul kernel (`model.attention.matmul_attention`) saves q, k, v and
        # its output, no logsumexp (its backward recomputes the softmax). A Llama's rotated q and
        # k (fp32 under autocast) are cast to bf16 first (`model.attention.autocast_inputs`): the
        # casts are what it saves, and the cast itself saves nothing. SDPA's backend (s.attention) plays
        # no part here
        return {"q, k, v": E * (d + 2 * kv) * a, "attention output": E * d * a, **joined}
    if packed_attention_kernel(s.device) == "documents" and s.attention == "math":
        up = 4 if s.device == "cpu" else a
        squares = B * ((T // 2) ** 2 + (T - T // 2) ** 2)
        if kv != d:  # grouped keys/values: the kernel saves its expanded copies, nothing more (measured)
            return {"q, k, v (k, v expanded)": 3 * E * d * up, "softmax probabilities": h * squares * up, **joined}
        return {
            "q, k, v": 3 * E * d * up,
            "softmax probabilities": h * squares * up,
            "attention output": E * d * a,
            "math kernel on document views: one more E x d (measured)": E * d * up,
            **joined,
        }
    # CPU flash per document, or FlexAttention (assumed to save what flash does; no GPU measured it)
    return {"q, k, v": E * (d + 2 * kv) * a, "attention output": E * d * a, "logsumexp": B * h * T * 4, **joined}


def block_saved(s: PlanSetup) -> dict[str, int]:
    """Bytes one transformer block saves for backward (no checkpointing), by tensor."""
    if not is_gpt2(s.config):
        return llama_block_saved(s)
    E, d = s.tokens, s.config.n_embd
    a, r, st = s.prec.act, s.prec.residual, _stat_bytes(s)
    # A matmul saves its input only to compute its weight's gradient: with LoRA a frozen matrix
    # needs it only when an adapter reads the same input (measured: frozen linears save nothing).
    needs_input = {t: _adapted(s, t) for t in LORA_TARGETS}
    out = {
        "LayerNorm inputs (residual stream)": 2 * E * d * r,
        "LayerNorm mean/rstd": 4 * E * st,
        "LayerNorm outputs (matmul inputs)": (needs_input["attn.c_attn"] + needs_input["mlp.c_fc"]) * E * d * a,
    }
    out.update(attention_saved(s))  # the SDPA output is attn.c_proj's input: saved by SDPA anyway
    _output_projection_input(s, out, needs_input["attn.c_proj"])
    out["MLP: GELU input"] = 4 * E * d * a
    out["MLP: GELU output"] = 4 * E * d * a if needs_input["mlp.c_proj"] else 0
    if s.lora_r:
        out["LoRA: A outputs (B's inputs)"] = len(s.lora_targets) * E * s.lora_r * a
    return out


def last_block_saved(s: PlanSetup) -> dict[str, int]:
    """What the last block saves when it computes only the label spans (`s.last_block_cut`):
    ln_1, c_attn and the keys/values for every token, everything after them on the R span rows
    (measured exact in fp32 and bf16 against the saved-tensor ledger). Spans that start after
    their document's first token attend through a lower-right causal mask, which SDPA turns into
    an additive mask of the query dtype (m x n per span)."""
    if not is_gpt2(s.config):
        return llama_last_block_saved(s)
    E, R, d, h = s.tokens, s.last_block_rows, s.config.n_embd, s.config.n_head
    a, r, st = s.prec.act, s.prec.residual, _stat_bytes(s)
    needs = {t: _adapted(s, t) for t in LORA_TARGETS}
    spans = s.label_spans()
    out = {
        "LayerNorm inputs (residual stream)": (E + R) * d * r,
        "LayerNorm mean/rstd": 2 * (E + R) * st,
        "LayerNorm outputs (matmul inputs)": needs["attn.c_attn"] * E * d * a + needs["mlp.c_fc"] * R * d * a,
    }
    if s.attention == "math" and s.device == "cpu" and a != 4:
        # CPU's math kernel upcasts each span's 16-bit q, k, v to fp32 and saves those copies,
        # not the 16-bit ones, and no output (measured)
        out["q, k, v (per span, fp32 copies)"] = d * 4 * sum(m + 2 * n for m, n in spans)
    else:
        out["q, k, v (k, v of every token; q gathered at the rows)"] = 3 * E * d * a + R * d * a
        out["attention output"] = R * d * a
    if s.attention == "math":
        up = 4 if s.device == "cpu" else a
        out["softmax probabilities"] = s.config.n_head * sum(m * n for m, n in spans) * up
    else:
        out["logsumexp"] = h * R * 4
    out["attention output, joined (c_proj input)"] = R * d * a * needs["attn.c_proj"]
    out["masks of spans after their document's start"] = sum(m * n for m, n in spans if 1 < m < n) * a
    out["MLP: GELU input"] = 4 * R * d * a
    out["MLP: GELU output"] = 4 * R * d * a * needs["mlp.c_proj"]
    out["row index (int64)"] = R * INDEX_BYTES
    if s.lora_r:
        rows = sum(R for t in s.lora_targets if t != "attn.c_attn") + E * ("attn.c_attn" in s.lora_targets)
        out["LoRA: A outputs (B's inputs)"] = rows * s.lora_r * a
    return out


def _output_projection_input(s: PlanSetup, saved: dict[str, int], trains: bool) -> None:
    """The attention output projection's own input, where it is a tensor attention does not
    save (the documents' outputs joined on packed rows, the math kernel's output made
    contiguous), is saved only by a projection that trains a weight (c_proj / o_proj, or its
    adapter's A): zeroed in `saved` otherwise."""
    own = "attention output, joined" if s.packed else "attention output" if s.attention == "math" else None
    for name in saved:
        if own is not None and name.startswith(own):
            saved[name] *= trains


def first_block_saved(s: PlanSetup) -> dict[str, int]:
    """What block 0 saves: as any block for full fine-tuning; under LoRA only what lies after
    its first adapter (checked against the saved-tensor ledger for every subset of targets)."""
    if not is_gpt2(s.config):
        return llama_block_saved(s, first=True)
    out = block_saved(s)
    if not s.lora_r:
        return out
    E, d, a = s.tokens, s.config.n_embd, s.prec.act
    grad = _block_0_input_grads(s)
    ln_2 = grad["mlp.c_fc"]  # ln_1's input (the embeddings) never needs a gradient
    out["LayerNorm inputs (residual stream)"] = E * d * s.prec.residual * ln_2
    out["LayerNorm mean/rstd"] = 2 * E * _stat_bytes(s) * ln_2
    if "attn.c_attn" not in s.lora_targets:  # q, k, v need no gradient: SDPA saves nothing
        out.update(dict.fromkeys(attention_saved(s), 0))
        out["attention output"] = E * d * a if "attn.c_proj" in s.lora_targets else 0  # saved by c_proj's A
    out["MLP: GELU input"] = 4 * E * d * a * grad["mlp.c_proj"]
    return out


# ---------------------------------------------------------------- the Llama family


def rms_norm_saved(s: PlanSetup, rows: int, width: int, readers: int, heads: int = 1, grad_in: bool = True) -> int:
    """What `llama.RMSNorm` saves over `rows` x `width`: an fp32 input itself and the rsqrt (one
    fp32 per row and head: `llama._RMSNorm`, and torch's fused CUDA kernel, recompute the
    normalized rows in backward); a 16-bit input (Qwen3's q/k norms under autocast) an upcast
    fp32 copy, the rsqrt and the normalized rows cast back to its dtype (only the weight's
    gradient needs them, so not under LoRA, where the weight is frozen). And its output as the
    input of the `readers` matmuls that save it (`norm_readers`): one tensor, or under autocast
    one 16-bit copy per matmul (autocast casts activations per op). The input's bytes are the
    residual stream's; for Qwen3's q/k norms (readers 0: the rotation after them saves only cos
    and sin) the projection's, `act`. An input that needs no gradient (`grad_in` False: block 0
    under LoRA reads the frozen embeddings) saves nothing but the outputs."""
    x = s.prec.residual if readers or heads == 1 else s.prec.act
    outputs = (readers if s.prec.autocast else min(readers, 1)) * rows * width * s.prec.act
    if not grad_in:
        return outputs
    normalized = 0 if x == 4 or s.lora_r else x
    return rows * width * (4 + normalized) + rows * heads * 4 + outputs


def _qk_norms(s: PlanSetup, q_rows: int, kv_rows: int, q_grad: bool = True, k_grad: bool = True) -> dict[str, int]:
    c = s.config
    if not c.qk_norm:
        return {}
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    both = rms_norm_saved(s, q_rows, q, 0, c.n_head, q_grad) + rms_norm_saved(s, kv_rows, kv, 0, c.n_kv_head, k_grad)
    return {"q/k RMSNorm per head (Qwen3)": both}


def stacked_readers(s: PlanSetup, names: tuple[str, ...]) -> int:
    """How many 16-bit copies of a norm's output the matmuls `names` save under autocast: one
    when they run as one matmul on stacked weights (`llama.stackable`: plain linears, not
    adapted; q/k/v not with Qwen3's per-head norms), else one per matmul (autocast casts per op)."""
    adapted = s.lora_r and any(n in s.lora_targets for n in names)
    if not s.prec.autocast or adapted or ("q_proj" in names and s.config.qk_norm):
        return len(names)
    return 1


def norm_readers(s: PlanSetup, names: tuple[str, ...], stacked: bool = True) -> int:
    """Of the matmuls `names` reading one norm's output, how many save it: full fine-tuning as
    `stacked_readers` (or each, where the model never stacks them: `stacked` False); under LoRA a
    frozen matmul needs no input for its weight's gradient, so only the adapted ones, through
    their A (measured: frozen linears save nothing)."""
    if not s.lora_r:
        return stacked_readers(s, names) if stacked else len(names)
    return sum(n in s.lora_targets for n in names)


QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def llama_block_saved(s: PlanSetup, first: bool = False) -> dict[str, int]:
    """One Llama-family block (measured with the saved-tensor ledger, fp32 and bf16 autocast):
    two RMSNorms, q/k norms (Qwen3), the rotated q and k and v (SDPA's saves, `attention_saved`;
    the rotation itself saves only cos and sin, shared by all blocks), the SwiGLU MLP
    (`swiglu_saved`). Under autocast the norms' fp32 outputs are cast to 16 bits once per matmul
    that reads them (`stacked_readers`).

    LoRA (frozen base): a frozen matmul saves no input, a norm no normalized rows, and each
    adapter its A's output (B's input). `first`: block 0 under LoRA reads the frozen embeddings,
    so a tensor there is saved for backward only downstream of an adapter (q, k or v each only
    when adapted; after attention only if one of q, k, v, o is)."""
    E, c, a = s.tokens, s.config, s.prec.act
    lora = bool(s.lora_r)
    grad_in = not (lora and first)
    q_g, k_g, v_g = (grad_in or (lora and n in s.lora_targets) for n in QKV)
    mid_g = grad_in or _block_0_input_grads(s)["mlp.gate_proj"]  # the MLP's input
    out = {
        "RMSNorm (attention): input, rsqrt, q/k/v inputs": rms_norm_saved(
            s, E, c.n_embd, norm_readers(s, QKV), grad_in=grad_in
        ),
        "RMSNorm (MLP): input, rsqrt, gate/up inputs": rms_norm_saved(
            s, E, c.n_embd, norm_readers(s, GATE_UP), grad_in=mid_g
        ),
        **_qk_norms(s, E, E, q_g, k_g),
        **_llama_attention_saved(s, q_g, k_g, v_g),
        **swiglu_saved(s, E, mid_g),
    }
    if lora:
        out["LoRA: A outputs (B's inputs)"] = len(s.lora_targets) * E * s.lora_r * a
    return out


def _llama_attention_saved(s: PlanSetup, q_g: bool = True, k_g: bool = True, v_g: bool = True) -> dict[str, int]:
    """What attention saves when q, k or v needs a gradient (all three but in block 0 under
    LoRA), with o_proj's input: the documents' outputs joined (packed rows), or the math kernel's
    output, is saved only where o_proj trains a weight; with none of q, k, v needing a gradient
    only an adapted o_proj keeps attention's output. The math kernel's ops save what the
    gradients asked for need (measured): k for dq, q for dk, v for either (dP), the
    probabilities for any; the fused kernels save all of q, k, v."""
    E, a, width = s.tokens, s.prec.act, attention_width(s.config)
    if not (q_g or k_g or v_g):
        return {"attention output (o_proj's adapter input)": E * width * a * _adapted(s, "o_proj")}
    saved = attention_saved(s)
    for name in ("q, k, v", "q, k, v (k, v expanded)"):
        if "softmax probabilities" in saved and name in saved:  # the math kernel ran
            saved[name] = saved[name] // 3 * (k_g + q_g + (q_g or k_g))
    _output_projection_input(s, saved, _adapted(s, "o_proj"))
    return saved


def swiglu_saved(s: PlanSetup, rows: int, grad: bool = True) -> dict[str, int]:
    """The SwiGLU MLP on `rows` whose input needs a gradient (`grad`; under LoRA in block 0 it
    may not): stacked (`llama.SwiGLUStacked`, under autocast with gate and up not adapted) it
    saves gate | up; else SiLU its input (gate), the product silu(gate) * up its two factors
    (SiLU's output and up), each as far as the other needs a gradient; down_proj its input
    where it trains a weight."""
    f, a = s.config.d_ff, s.prec.act
    down = {"SwiGLU: product (down_proj input)": rows * f * a * _adapted(s, "down_proj")}
    if stacked_readers(s, GATE_UP) == 1:
        return {"SwiGLU: gate | up": 2 * rows * f * a * grad, **down}
    gate_g = grad or "gate_proj" in s.lora_targets
    up_g = grad or "up_proj" in s.lora_targets
    return {"SwiGLU: gate, up, SiLU output": rows * f * a * (2 * gate_g + up_g), **down}


def llama_last_block_saved(s: PlanSetup) -> dict[str, int]:
    """The last block cut to the R label-span rows (`LastBlockRows`): the attention norm, k, v and
    their rotation on every token; q_proj's input gathered at the rows, the rows' cos and sin
    (gathered copies), and everything after on the rows (measured exact against the ledger).
    Under LoRA as `llama_block_saved` says, with each adapter's A output on the rows its
    matmul reads (k and v: every token)."""
    E, R, c, a = s.tokens, s.last_block_rows, s.config, s.prec.act
    q, kv, h = attention_width(c), c.n_kv_head * c.head_dim, c.n_head
    spans = s.label_spans()
    out = {
        "RMSNorm (attention), k/v inputs on every token": rms_norm_saved(
            s, E, c.n_embd, norm_readers(s, ("k_proj", "v_proj"), stacked=False)
        ),
        "q_proj input (gathered rows)": R * c.n_embd * a * _adapted(s, "q_proj"),
        "rotary cos, sin at the rows": 2 * R * c.head_dim * s.prec.residual,
        **_qk_norms(s, R, E),
    }
    if s.attention == "math":  # per span: q, and k, v expanded to every query head, probabilities
        up = 4 if s.device == "cpu" else a
        out["q, k, v (per span, k and v expanded to the query heads)"] = (
            h * c.head_dim * up * sum(m + 2 * n for m, n in spans)
        )
        out["softmax probabilities"] = h * sum(m * n for m, n in spans) * up
    else:  # under autocast the rotated (fp32) keys are cast per span: only the spans' documents
        k_rows = sum(n for _, n in spans) if s.prec.autocast else E
        out["q, k, v (k, v of every token; q at the rows)"] = R * q * a + (k_rows + E) * kv * a
        out["attention output"] = R * q * a
        out["logsumexp"] = h * R * 4
    out["attention output, joined (o_proj input)"] = R * q * a * _adapted(s, "o_proj")
    out["masks of spans after their document's start"] = sum(m * n for m, n in spans if 1 < m < n) * a
    out["RMSNorm (MLP) on the rows, gate/up inputs"] = rms_norm_saved(s, R, c.n_embd, norm_readers(s, GATE_UP))
    out.update({f"{k} on the rows": v for k, v in swiglu_saved(s, R).items()})
    out["row index (int64)"] = R * INDEX_BYTES
    if s.lora_r:
        rows = sum(E if t in ("k_proj", "v_proj") else R for t in s.lora_targets)
        out["LoRA: A outputs (B's inputs)"] = rows * s.lora_r * a
    return out


LOSS_CHUNKED = "loss: grad_h, grad_w"


def loss_saved(s: PlanSetup) -> dict[str, int]:
    E, d, V = s.tokens, s.config.n_embd, s.config.vocab_size
    if s.loss == "chunked":
        grad_w = 0 if s.lora_r else V * d * 4  # a frozen (tied) head gets no gradient buffer
        return {LOSS_CHUNKED: s.label_tokens * d * s.prec.residual + grad_w}
    return {
        "loss: head input": E * d * s.prec.act,
        "loss: logits (held by the caller)": E * V * s.prec.act,
        "loss: fp32 log-softmax": E * V * 4,
    }


def loss_transients(s: PlanSetup) -> tuple[int, int]:
    """(extra bytes during the loss forward, extra bytes during its backward)."""
    E, d, V, a = s.tokens, s.config.n_embd, s.config.vocab_size, s.prec.act
    if s.loss == "full":
        upcast = E * V * 4 if a != 4 else 0  # logits.float() before the softmax
        return upcast, E * V * 4 + E * V * a
    rows = min(s.chunk_size, s.label_tokens)
    # One fp32 logits buffer serves every chunk: log-softmax, then dlogits, in place in it. Under
    # mixed precision the 16-bit matmul output is copied into it, dlogits gets a 16-bit copy for
    # the gradient matmuls, and (head trained) the 16-bit V x d product of a chunk is added into
    # the fp32 grad_w. The first chunk's matmul writes grad_w itself (counted as saved), and the
    # backward scales the saved gradients in place: no extra bytes.
    low = a if a != 4 else 0
    head_trained = not s.lora_r
    chunk = rows * V * 4 + (rows * V * low + (V * d * low if head_trained else 0) if low else 0)
    weight_cast = V * d * a if s.prec.autocast else 0
    return chunk + weight_cast, 0


def _weight_copies(s: PlanSetup) -> int:
    """Autocast's 16-bit copies of the block matmul weights (and of LoRA factors) kept for backward."""
    if not s.prec.autocast:
        return 0
    c, a = s.config, s.prec.act
    copies = block_matmul_weights(c) * a * c.n_layer
    if s.lora_r:  # block 0's frozen matmuls whose input needs no gradient keep no copy
        adapted, grad = lora_matmuls(c, s.lora_targets), _block_0_input_grads(s)
        copies -= sum(fan_in * fan_out for t, (fan_in, fan_out) in block_matmuls(c).items() if not grad[t]) * a
        # nor do their adapters' A (the input's gradient is what A's copy serves; A's own
        # gradient needs the input only): B's input is A's output, which always needs one
        idle_a = sum(fan_in for t, (fan_in, _) in adapted.items() if not grad[t])
        copies += _lora_copies(s) - s.lora_r * idle_a * a
    return copies


def _stacked_weight_copies(s: PlanSetup) -> int:
    """Bytes of the 16-bit copies of the weights that run stacked (q/k/v, gate/up), all layers."""
    c = s.config
    if is_gpt2(c) or not s.prec.autocast:
        return 0
    qkv = c.n_embd * (c.n_head + 2 * c.n_kv_head) * c.head_dim
    qkv *= stacked_readers(s, ("q_proj", "k_proj", "v_proj")) == 1
    gate_up = 2 * c.n_embd * c.d_ff * (stacked_readers(s, ("gate_proj", "up_proj")) == 1)
    return (qkv + gate_up) * s.prec.act * c.n_layer


def _lora_copies(s: PlanSetup) -> int:
    """Autocast's 16-bit copies of the LoRA factors A and B of every adapted matrix: r x (in + out) each."""
    if not s.prec.autocast:
        return 0
    c = s.config
    return s.lora_r * s.prec.act * c.n_layer * sum(sum(fans) for fans in lora_matmuls(c, s.lora_targets).values())


def _blocks_saved(s: PlanSetup, per_block: dict[str, int]) -> int:
    """All blocks, no checkpointing: block 0 (see first_block_saved), the middle ones, and the
    last one cut to the label spans where the model does that. One block under LoRA counts as
    the cut last block (an approximation: block 0's frozen-input rules are not applied to it)."""
    L = s.config.n_layer
    if not s.last_block_cut:
        return (L - 1) * sum(per_block.values()) + sum(first_block_saved(s).values())
    last = sum(last_block_saved(s).values())
    if L == 1:
        return last
    return (L - 2) * sum(per_block.values()) + sum(first_block_saved(s).values()) + last


def plan_activations(s: PlanSetup) -> ActivationPlan:
    c = s.config
    E, d, L = s.tokens, c.n_embd, c.n_layer
    per_block = block_saved(s)
    # With LoRA the embeddings are frozen: the lookups save no ids (and see first_block_saved).
    # GPT-2 looks up tokens and positions, the Llama family tokens only.
    saved = {"embedding ids": 0 if s.lora_r else (2 if is_gpt2(c) else 1) * E * INDEX_BYTES}
    if s.checkpointing:
        saved["block inputs (checkpointed)"] = L * E * d * s.prec.residual
    else:
        if not is_gpt2(c):  # one cos and one sin (E x head_dim) serve every block (measured)
            saved["rotary cos, sin (shared by the blocks)"] = 2 * E * c.head_dim * s.prec.residual
        saved["transformer blocks"] = _blocks_saved(s, per_block)
    # The chunked loss reads the label rows only: the model gathers them before the final
    # LayerNorm (saving the int64 positions), or its cut last block already returns them.
    n = s.head_rows
    gather = n * INDEX_BYTES if s.loss == "chunked" and not s.last_block_cut else 0
    if is_gpt2(c):
        final = n * d * s.prec.residual + 2 * n * _stat_bytes(s)
        saved["final LayerNorm (on the rows the loss reads)"] = final + gather
    else:
        saved["final RMSNorm (on the rows the loss reads)"] = rms_norm_saved(s, n, d, readers=0) + gather
    saved.update(loss_saved(s))
    loss_fwd, loss_bwd = loss_transients(s)
    weight_copies = _weight_copies(s)
    # Autocast caches only the casts of leaf tensors that require grad. Under checkpointing nothing
    # is saved, so what stays alive to the end of forward is that cache: all block weights for
    # full fine-tuning, only the adapters' factors with LoRA (a frozen weight's copy is made and
    # freed per matmul; measured on gpt2: +170 MB at the end of a checkpointed bf16 forward for
    # full fine-tuning, +0 MB with LoRA). Stacked weights (`stacked_readers`) are not leaves: not cached.
    cached = _lora_copies(s) if s.lora_r else weight_copies - _stacked_weight_copies(s)
    one_block = sum(per_block.values()) + block_matmul_weights(c) * s.prec.act * s.prec.autocast
    return ActivationPlan(
        per_block=per_block,
        saved=saved,
        weight_copies=cached if s.checkpointing else weight_copies,
        weight_copies_saved=0 if s.checkpointing else weight_copies,
        recompute=one_block if s.checkpointing else 0,
        loss_transient=loss_fwd,
        loss_backward=loss_bwd,
    )
