"""The Llama block family in one file: Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5 and Qwen3 share it.

A pre-norm decoder: RMSNorm, grouped-query attention with rotary position embeddings, a SwiGLU
MLP, no position table. The families differ in small switches, all read from their config.json
(`qatune.model.llama_hf_io`): Qwen2 adds a bias to q/k/v, Qwen3 normalises each query and
key head (RMSNorm over head_dim) before the rotation, Llama 3.1+ stretches the rotary
frequencies ("llama3" scaling), small models tie the output head to the token embedding.

Same interface as `qatune.model.gpt2.GPT2`: the forward returns hidden states after the final
norm (the caller applies `lm_head` only where it needs logits), packed rows attend per
document, `outputs=` cuts the last block to the rows read, and generation uses `new_kv_cache`.
The attention kernels, the KV cache and the block loop are shared (`qatune.model.attention`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qatune.errors import UserError
from qatune.model.attention import (
    Attention,
    DecoderLM,
    KVCache,
    LastBlockRows,
    forward_positions,
    run_blocks,
)

# Rotary scalings computed here; the others that models ship are refused by name when loading.
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding: the angle of pair i at position p is p * inv_freq[i], with
    inv_freq[i] = theta^(-2i/head_dim) (RoFormer, Su et al. 2021), optionally rescaled."""

    theta: float = 10000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # linear: every frequency / factor; llama3: the low frequencies / factor
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / low_freq_factor are scaled fully
    high_freq_factor: float = 4.0  # llama3: wavelengths below original / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3: the context pretraining used

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise UserError(f"rope type {self.type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")

    def inv_freq(self, head_dim: int, device=None) -> torch.Tensor:
        """(head_dim / 2,) float32 frequencies, computed as transformers does (same float ops)."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.type == "linear":  # positions / factor, folded into the frequencies
            return inv_freq / self.factor
        if self.type == "llama3":
            return self._llama3(inv_freq)
        return inv_freq

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """Llama 3.1's scaling: wavelengths longer than original / low_freq_factor are divided by
        `factor`, those shorter than original / high_freq_factor kept, the band between
        interpolated smoothly (Meta's llama-models `apply_scaling`)."""
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class LlamaConfig:
    """Names follow `GPT2Config` where the meaning is the same (n_layer, n_embd, n_head,
    n_positions, vocab_size, dropout), so code that reads a config reads either family."""

    model_type: str = "llama"  # llama | mistral | qwen2 | qwen3: what config.json says, kept for export
    n_layer: int = 16
    n_embd: int = 2048
    n_head: int = 32
    n_kv_head: int = 8  # grouped-query attention: each key/value head serves n_head / n_kv_head queries
    head_dim: int = 64  # not always n_embd / n_head (Qwen3: 128 at every size)
    d_ff: int = 8192  # the SwiGLU's inner width
    n_positions: int = 131072  # max_position_embeddings
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope: Rope = field(default_factory=Rope)
    qkv_bias: bool = False  # Qwen2 (and Llama's attention_bias)
    out_bias: bool = False  # the attention output projection's bias (Llama's attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each query and key head before the rotation
    tie_embeddings: bool = False  # the output head is the token embedding
    # Mistral/Qwen sliding-window attention: a query sees only the last `sliding_window` keys.
    # Below that many positions it is plain causal attention, so qatune runs positions up to the
    # window and refuses longer ones rather than attend differently from the checkpoint.
    sliding_window: int | None = None
    dropout: float = 0.0  # on the attention probabilities only (attention_dropout), as these models do
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} is odd; rotary embeddings rotate pairs")

    def to_dict(self) -> dict:
        return asdict(self)


# Published shapes as data, for random-init runs and plans (SmolLM2-135M: 134,515,008 parameters).
SIZES: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(
        n_layer=30,
        n_embd=576,
        n_head=9,
        n_kv_head=3,
        head_dim=64,
        d_ff=1536,
        n_positions=8192,
        vocab_size=49152,
        rope=Rope(theta=100000.0),
        tie_embeddings=True,
    ),
}


class _RMSNorm(torch.autograd.Function):
    """RMSNorm with its gradient written out. With x^ = x * r, r = 1 / sqrt(mean(x^2) + eps) per
    row, and the upstream gradient g:

        dw = sum over rows of g * x^
        dx = r * (g*w - x^ * mean(g*w * x^))

    torch's `rms_norm` has a fused CUDA backward; on a CPU, when a gradient is needed, it runs as
    pow, mean, rsqrt and two muls with autograd through each, and saves the normalized rows for
    the weight's gradient besides the input. Measured at SmolLM2-135M's width (1,800 x 576 fp32,
    one thread): 3.2 ms forward + backward that way, 2.2 ms here, and one rows x width fp32
    tensor less saved per norm: only the input and r are kept, x^ is recomputed (one multiply)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)  # x * x: pow(x, 2)'s bits, a third of its time
        ctx.save_for_backward(x, weight, r)
        # the products in rms_norm's order: (x * r) * w
        return (x * r).mul_(weight)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        x_hat = x * r
        dw = (g * x_hat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            gw = g * weight
            dx = gw.sub_(x_hat.mul_((gw * x_hat).mean(-1, keepdim=True))).mul_(r)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension, x and weight of one dtype: the function
    above where torch has no fused backward (a CPU, eager, gradient needed), else torch's."""
    eager_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()  # inductor fuses torch's own
    if eager_cpu and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), in float32 and cast back before the weight,
    as Llama's reference code does: the same numbers in bf16 as the checkpoint's own code. fp64
    stays fp64 (not rounded to fp32 as `x.float()` would): the fp64 equivalence tests compare the
    math, and an fp32 norm flips last bits between two orderings of the same sums (packed rows)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64) and x.dtype == self.weight.dtype:
            # the same products in fewer passes over x (`_RMSNorm`)
            return rms_norm(x, self.weight, self.eps)
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (..., heads, head_dim) with cos/sin (..., head_dim). Pairs are
    (i, i + head_dim/2), the "rotate half" layout of the Hugging Face checkpoints (their q/k
    weights are permuted for it; Meta's originals rotate interleaved pairs)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RotateStacked(torch.autograd.Function):
    """q and k rotated (as `rotate`), v copied out, from the stacked projection qkv (..., q heads
    + 2 kv heads, head_dim) of 16-bit values: q, k and v in qkv's dtype, each contiguous.

    The same numbers as `rotate` in fp32 followed by the cast to 16 bits that attention makes
    (an fp32 fused multiply-add may change a last bit), in fewer passes: no negated half, no
    concatenation, no fp32 q and k kept until attention casts them. Backward writes the three
    gradients into one buffer for qkv in place of autograd's zero-filled slices summed, and
    rounds the rotated-back gradient to 16 bits once (autograd rounds each of the two products,
    then their sum). Saves only cos and sin. Needs cos and sin whose two halves are equal (the
    angles are concatenated twice, `Llama.rotary`)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q: int, n_kv: int):
        half = qkv.shape[-1] // 2
        c, s = cos[..., None, :half], sin[..., None, :half]
        ctx.save_for_backward(cos, sin)
        ctx.heads = (n_q, n_kv)
        q = _rotate_halves(qkv[..., :n_q, :], c, s, sign=1.0)
        k = _rotate_halves(qkv[..., n_q : n_q + n_kv, :], c, s, sign=1.0)
        return q, k, qkv[..., n_q + n_kv :, :].contiguous()

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        n_q, n_kv = ctx.heads
        half = dq.shape[-1] // 2
        c, s = cos[..., None, :half], sin[..., None, :half]
        dqkv = torch.empty((*dq.shape[:-2], n_q + 2 * n_kv, dq.shape[-1]), dtype=dq.dtype, device=dq.device)
        dqkv[..., :n_q, :] = _rotate_halves(dq, c, s, sign=-1.0)  # the rotation's transpose: angle -θ
        dqkv[..., n_q : n_q + n_kv, :] = _rotate_halves(dk, c, s, sign=-1.0)
        dqkv[..., n_q + n_kv :, :] = dv
        return dqkv, None, None, None, None


def _rotate_halves(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, sign: float) -> torch.Tensor:
    """x rotated by +θ (sign 1) or -θ (sign -1) in fp32, returned in x's dtype, contiguous:
    (x1, x2) -> (x1 c - sign x2 s, x2 c + sign x1 s), c and s the half-width cos and sin."""
    half = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, c.dtype), device=x.device)
    # one upcast of x (exact), not one per product: mixed-dtype products copy their 16-bit operand
    x_up = x.to(out.dtype)
    x1, x2 = x_up[..., :half], x_up[..., half:]
    torch.mul(x1, c, out=out[..., :half]).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=out[..., half:]).addcmul_(x1, s, value=sign)
    return out.to(x.dtype)


def stackable(x: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether linears reading the same x run as one matmul on their stacked weights: under
    autocast, where each weight is copied to 16 bits anyway (the stacked copy replaces those
    copies byte for byte), and only for plain `nn.Linear`s (a LoRA-wrapped one runs its adapter).
    In fp32 the stacked weight would be an extra copy saved for backward (~280 MB at
    SmolLM2-135M), for no cast saved."""
    return torch.is_autocast_enabled(x.device.type) and all(type(m) is nn.Linear for m in modules)


def stacked_linear(x: torch.Tensor, *linears: nn.Linear) -> torch.Tensor:
    """The linears' outputs side by side, from one matmul on their stacked weights (and biases).

    Stacking copies the weights once per call (d x outputs, small next to the activations); under
    autocast the stacked weight is cast to 16 bits once, as each weight would be."""
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return F.linear(x, weight, bias)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=c.out_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps)
        self.qk_norm = c.qk_norm
        self.dropout = c.dropout

    def _heads(self, x: torch.Tensor, proj: nn.Linear, heads: int, norm: str) -> torch.Tensor:
        """(..., d) -> (..., heads, head_dim), head-normalised for Qwen3."""
        t = proj(x).unflatten(-1, (heads, self.head_dim))
        return getattr(self, norm)(t) if self.qk_norm else t

    def forward(self, x, attention: Attention, layer: int, kv_cache: KVCache | None, rope):
        cos, sin = rope
        if self.qk_norm or not stackable(x, self.q_proj, self.k_proj, self.v_proj):
            q = rotate(self._heads(x, self.q_proj, self.n_head, "q_norm"), cos, sin)
            k = rotate(self._heads(x, self.k_proj, self.n_kv_head, "k_norm"), cos, sin)
            v = self.v_proj(x).unflatten(-1, (self.n_kv_head, self.head_dim))
        else:
            q, k, v = self._fused_qkv(x, cos, sin)
        y = attention(q, k, v, self.dropout if self.training else 0.0, layer, kv_cache)
        return self.o_proj(y.flatten(2))

    def _fused_qkv(self, x, cos, sin):
        """q, k, v from one matmul over the three weights stacked, q and k rotated by one
        function (`RotateStacked`). Under autocast the normed input is cast to 16 bits, and saved
        for backward, once instead of three times, and its gradient is one matmul rounded to 16
        bits once instead of three rounded and summed (measured at SmolLM2-135M shapes in
        docs/performance.md). v is copied out, so that what attention saves for backward does not
        keep all of qkv alive."""
        qkv = stacked_linear(x, self.q_proj, self.k_proj, self.v_proj).unflatten(-1, (-1, self.head_dim))
        if not torch.compiler.is_compiling():
            return RotateStacked.apply(qkv, cos, sin, self.n_head, self.n_kv_head)
        # traced by torch.compile: the plain ops, which inductor fuses itself (it fails to lower
        # the function's out= writes into slices)
        q, k = rotate(qkv[..., : self.n_head + self.n_kv_head, :], cos, sin).split((self.n_head, self.n_kv_head), -2)
        return q, k, qkv[..., self.n_head + self.n_kv_head :, :].contiguous()

    def forward_rows(self, x, rows: LastBlockRows, rope):
        """The attention output at `rows` only: keys and values for every token, the query (and
        its rotation) only at the rows. x: (1, E, d) -> (R, d)."""
        cos, sin = (t.squeeze(0) for t in rope)
        x = x.squeeze(0)
        cos_r, sin_r = cos.index_select(0, rows.index), sin.index_select(0, rows.index)
        q = rotate(self._heads(x.index_select(0, rows.index), self.q_proj, self.n_head, "q_norm"), cos_r, sin_r)
        k = rotate(self._heads(x, self.k_proj, self.n_kv_head, "k_norm"), cos, sin)
        v = self.v_proj(x).unflatten(-1, (self.n_kv_head, self.head_dim))
        y = rows.attend(q, k, v, self.dropout if self.training else 0.0)
        return self.o_proj(y.flatten(1))


class SwiGLUStacked(torch.autograd.Function):
    """silu(gate) * up from the stacked projection h = (gate | up) (..., 2 d_ff), saving only h.

    Autograd's version also keeps SiLU's output (one more tokens x d_ff per block: 377 MB in bf16
    at SmolLM2-135M's 30 blocks and 4,096 tokens) and joins the two gradients with a copy;
    here backward recomputes SiLU and writes both gradients into one buffer. The same bits:
    d_up = g * silu(gate), d_gate = silu'(gate) * (g * up), each product in h's dtype."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        d_gate, d_up = dh.chunk(2, dim=-1)
        torch.mul(g, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(g * up, gate, grad_input=d_gate)
        return dh


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.d_ff, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.n_embd, config.d_ff, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.mlp_bias)

    def forward(self, x):
        if not stackable(x, self.gate_proj, self.up_proj):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = stacked_linear(x, self.gate_proj, self.up_proj)  # one read of x
        if torch.compiler.is_compiling():  # inductor fuses the plain ops (see LlamaAttention._fused_qkv)
            gate, up = h.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(SwiGLUStacked.apply(h))


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, attention: Attention, layer: int = 0, kv_cache: KVCache | None = None, rows=None, rope=None):
        if rows is not None:  # through forward, so that module hooks (FSDP's unshard) still run
            return self.forward_rows(x, rows, rope)
        x = x + self.self_attn(self.input_layernorm(x), attention, layer, kv_cache, rope)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_rows(self, x, rows: LastBlockRows, rope):
        """The block's output at `rows` only (see LastBlockRows). x: (1, E, d) -> (R, d)."""
        # squeeze, not x[0]: select's backward zero-fills and copies a full-size gradient
        x = x.squeeze(0).index_select(0, rows.index) + self.self_attn.forward_rows(self.input_layernorm(x), rows, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(DecoderLM):
    """Parameter names are the transformers checkpoint's without the `model.` prefix; the untied
    head is `output` (`lm_head.weight` in the checkpoint: `lm_head` here is the method)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.activation_checkpointing = False
        # How packed rows attend: auto = FlexAttention on GPU, per-document SDPA on CPU.
        self.attention_kernel = "auto"
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # per device, built on first use
        self.apply(self._init_weights)

    @property
    def head_weight(self) -> torch.Tensor:
        """The (vocab, d) matrix of the output head: the token embedding when tied."""
        return self.embed_tokens.weight if self.output is None else self.output.weight

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for the given hidden states."""
        return F.linear(hidden, self.head_weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        outputs: torch.Tensor | None = None,
        sparse_embedding_grad: bool = False,
    ) -> torch.Tensor:
        """Hidden states (B, T, d) after the final RMSNorm, or (len(outputs), d) at `outputs`.

        The arguments mean what they mean for `GPT2.forward`. position_ids drive the rotation
        (restarted per document in packed rows). sparse_embedding_grad applies only with a tied
        head, whose dense gradient the sparse one is added to; an untied embedding's gradient
        would reach the optimizer alone, so it stays dense."""
        B, T = input_ids.shape
        limit = min(self.config.n_positions, self.config.sliding_window or self.config.n_positions)
        past, position_ids = forward_positions(input_ids, position_ids, kv_cache, outputs, limit)
        attention = self.attention_for(B, T, past, doc_ids, attention_mask, kv_cache, input_ids.device)
        input_ids, position_ids = attention.drop_padding(input_ids), attention.drop_padding(position_ids)
        sparse = sparse_embedding_grad and self.output is None
        x = F.embedding(input_ids, self.embed_tokens.weight, sparse=True) if sparse else self.embed_tokens(input_ids)
        return run_blocks(self, self.layers, x, attention, kv_cache, outputs, self.norm, self.rotary(position_ids, x))

    def rotary(self, position_ids: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, T, head_dim) at the positions: angles in float32 (bf16 positions would
        be rounded to 8 bits), then cast to the activations' dtype, as transformers does."""
        device = position_ids.device
        if device not in self._inv_freq:
            self._inv_freq[device] = self.config.rope.inv_freq(self.config.head_dim, device)
        angles = position_ids[..., None].float() * self._inv_freq[device]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)
