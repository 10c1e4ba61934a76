"""GPT-2 in one file: config, the four published sizes, the network, and a KV cache.

The forward pass returns hidden states after the final LayerNorm, not logits: the caller applies
the (tied) LM head only where it needs it. Training applies it only at positions that carry a
label, generation only at the last position — this is where most of our memory saving comes from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qatune.errors import UserError

# The attention machinery is shared by every family; imported here under its old home too.
from qatune.model.attention import (  # noqa: F401
    ATTENTION_KERNELS,
    Attention,
    DecoderLM,
    DenseAttention,
    DocumentAttention,
    FlexDocumentAttention,
    KVCache,
    LastBlockRows,
    attention_for,
    causal_mask,
    document_lengths,
    forward_positions,
    packed_attention_kernel,
    packed_kernel,
    run_blocks,
)


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_positions: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # one rate for embeddings, attention output and residual branches

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self) -> int:
        return self.n_head  # every head has its own keys and values (no grouped-query attention)

    @property
    def d_ff(self) -> int:
        return 4 * self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)


# The published OpenAI sizes, as data (Radford et al. 2019, table 2). gpt2-large has ~774M
# parameters; the 1.5B model is gpt2-xl.
SIZES: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": GPT2Config(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": GPT2Config(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": GPT2Config(n_layer=48, n_embd=1600, n_head=25),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attention: Attention, layer: int = 0, kv_cache: KVCache | None = None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in self.c_attn(x).split(C, dim=2))
        y = attention(q, k, v, self.dropout if self.training else 0.0, layer, kv_cache)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, C)))

    def forward_rows(self, x, rows: LastBlockRows):
        """The attention output at `rows` only: keys and values for every token (later rows
        read them), queries, attention and c_proj only for the rows. x: (1, E, C) -> (R, C)."""
        C = x.shape[2]
        q, k, v = self.c_attn(x).squeeze(0).split(C, dim=1)
        q = q.index_select(0, rows.index)
        heads = lambda t: t.view(t.shape[0], self.n_head, C // self.n_head)  # noqa: E731
        y = rows.attend(heads(q), heads(k), heads(v), self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.reshape(-1, C)))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_ff)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, attention: Attention, layer: int = 0, kv_cache: KVCache | None = None, rows=None):
        if rows is not None:  # through forward, so that module hooks (FSDP's unshard) still run
            return self.forward_rows(x, rows)
        x = x + self.attn(self.ln_1(x), attention, layer, kv_cache)
        return x + self.mlp(self.ln_2(x))

    def forward_rows(self, x, rows: LastBlockRows):
        """The block's output at `rows` only (see LastBlockRows). x: (1, E, d) -> (R, d)."""
        # squeeze, not x[0]: select's backward zero-fills and copies a full-size gradient
        x = x.squeeze(0).index_select(0, rows.index) + self.attn.forward_rows(self.ln_1(x), rows)
        return x + self.mlp(self.ln_2(x))


class GPT2(DecoderLM):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.activation_checkpointing = False
        # How packed rows attend: auto = FlexAttention on GPU, per-document SDPA on CPU.
        self.attention_kernel = "auto"
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @property
    def head_weight(self) -> torch.Tensor:
        """The (vocab, d) matrix of the output head: GPT-2 ties it to the token embedding."""
        return self.wte.weight

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for the given hidden states; the head is tied to the token embedding."""
        return F.linear(hidden, self.wte.weight)

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
        """Hidden states (B, T, d) after the final LayerNorm, or (len(outputs), d) at `outputs`.

        position_ids: (B, T); restarted per document in packed rows. Default 0..T-1 (offset by the
            cache length when decoding).
        doc_ids: (B, T) document id per token; tokens attend only to earlier tokens of the same
            document (block-causal attention for packed rows).
        attention_mask: (B, T) 1 for real tokens, 0 for padding (left padding in generation).
        outputs: flat positions (into B*T) of the only hidden states wanted, in the order wanted
            (e.g. `Batch.label_index`). With per-document attention the last block then runs its
            queries, attention, MLP and the final LayerNorm only at those positions
            (`LastBlockRows`); with the other kernels only the final LayerNorm is cut.
        sparse_embedding_grad: the token embedding's gradient as a sparse tensor (one row per
            input token) instead of a zero-filled vocab x d one. Only for a loss that also uses
            the tied head, whose dense gradient it is then added to (alone, a sparse gradient
            would reach the optimizer).
        """
        B, T = input_ids.shape
        past, position_ids = forward_positions(input_ids, position_ids, kv_cache, outputs, self.config.n_positions)
        attention = self.attention_for(B, T, past, doc_ids, attention_mask, kv_cache, input_ids.device)
        input_ids, position_ids = attention.drop_padding(input_ids), attention.drop_padding(position_ids)
        tokens = F.embedding(input_ids, self.wte.weight, sparse=True) if sparse_embedding_grad else self.wte(input_ids)
        x = self.drop(tokens + self.wpe(position_ids))
        return run_blocks(self, self.h, x, attention, kv_cache, outputs, self.ln_f)
