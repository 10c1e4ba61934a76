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
from torch.utils.checkpoint import checkpoint

from qatune.errors import UserError


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


class KVCache:
    """Preallocated keys/values for every layer; `length` tokens are filled so far.

    `key_valid` (B, max_len) marks which cached positions are real tokens (False on left padding),
    so that padded prompts never attend to their padding during decoding.
    """

    def __init__(self, config: GPT2Config, batch: int, max_len: int, device, dtype) -> None:
        shape = (config.n_layer, batch, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


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


# ---------------------------------------------------------------- attention kernels
# One forward picks one kernel for all layers (`GPT2.attention_for`). Each takes q, k, v as
# (B, T, heads, head_dim) and returns the same shape. Packed rows (doc_ids) have three exact ways
# to attend within each document; they agree in values and gradients (tests/test_attention.py).


class DenseAttention:
    """SDPA with a boolean (B, 1, T, keys) mask, or plain causal when the mask is None.

    The reference for the packed kernels, and the only kernel for left padding and the KV cache.
    With a mask SDPA computes every (query, key) block, masked or not."""

    def __init__(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def drop_padding(self, t: torch.Tensor) -> torch.Tensor:
        return t  # runs on the rows as given

    def restore_padding(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, q, k, v, dropout_p: float, layer: int = 0, kv_cache: KVCache | None = None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        if self.mask is None:  # plain causal: lets SDPA pick its flash kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout_p)
        return y.transpose(1, 2)


class DocumentAttention:
    """Packed rows as one sequence of their real tokens, plain causal SDPA on each document.

    Padding (doc id < 0) is dropped before the first block and restored as zeros after the last,
    so no compute goes to it; attention costs sum(n_doc^2) instead of T^2 per row and never
    touches a masked block. On CPU it was measured faster than the dense mask
    (benchmarks/attention.py). The boundaries are read on the host, so on a GPU this syncs once
    per forward: there FlexAttention is the default."""

    def __init__(self, doc_ids: torch.Tensor) -> None:
        self.rows = doc_ids.shape
        real = doc_ids.flatten() >= 0
        self.keep = None if bool(real.all()) else real.nonzero().flatten()
        self.lengths = document_lengths(doc_ids)

    def drop_padding(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (1, real tokens, ...)."""
        flat = t.flatten(0, 1)
        return (flat if self.keep is None else flat.index_select(0, self.keep))[None]

    def restore_padding(self, x: torch.Tensor) -> torch.Tensor:
        """(1, real tokens, C) -> (B, T, C), zeros at the padding."""
        B, T = self.rows
        if self.keep is None:
            return x.view(B, T, -1)
        return x.new_zeros(B * T, x.shape[-1]).index_copy(0, self.keep, x[0]).view(B, T, -1)

    def __call__(self, q, k, v, dropout_p: float, layer: int = 0, kv_cache: KVCache | None = None):
        out = []
        for qd, kd, vd in zip(*(t[0].split(self.lengths) for t in (q, k, v))):
            # (n, H, D) -> (1, H, n, D): SDPA's CPU flash kernel wants 4-d inputs (3-d runs the
            # slower math path)
            qd, kd, vd = (t.transpose(0, 1)[None] for t in (qd, kd, vd))
            y = F.scaled_dot_product_attention(qd, kd, vd, dropout_p=dropout_p, is_causal=True)
            out.append(y[0].transpose(0, 1))
        return torch.cat(out)[None]


def document_lengths(doc_ids: torch.Tensor) -> list[int]:
    """Lengths of the documents of packed rows in reading order: runs of one doc id, a run never
    crossing a row, padding runs (doc id < 0) left out."""
    B, T = doc_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = starts.flatten().nonzero().flatten()
    bounds = first.tolist() + [B * T]
    ids = doc_ids.flatten()[first].tolist()
    return [end - start for start, end, doc in zip(bounds, bounds[1:], ids) if doc >= 0]


class LastBlockRows:
    """Which rows the last block computes when only some positions' hidden states are wanted.

    Nothing after the last block's keys and values mixes positions, so a position no caller reads
    needs no query, attention output, MLP or final LayerNorm there. The rows are exactly the
    wanted positions; each one's query attends to the keys from its document's start up to
    itself. For SFT the wanted positions are the answer tokens (plus, when monitoring, a sample
    of prompt positions spread anywhere in the documents), so the last block's MLP and attention
    run on those alone; the earlier blocks still run on every token, since later tokens' keys and
    values depend on them.

    Built from per-document attention (padding dropped, documents in reading order): `outputs`
    are flat positions into the (B, T) batch; rows are indices into the real tokens."""

    def __init__(self, attention: DocumentAttention, outputs: torch.Tensor) -> None:
        B, T = attention.rows
        real = _compact_positions(outputs.cpu(), B * T, attention.keep)
        index = real.unique()  # sorted: each document's rows lie together, in position order
        bounds = torch.tensor([0, *attention.lengths]).cumsum(0)
        doc = torch.searchsorted(bounds, index, right=True) - 1
        counts = torch.bincount(doc, minlength=len(attention.lengths))
        # per wanted document: (first row of its keys, its rows' positions within the document)
        self.docs = [
            (int(bounds[j]), rows - bounds[j])
            for j, rows in zip(counts.nonzero().flatten().tolist(), index.split(counts[counts > 0].tolist()))
        ]
        self.index = index.to(outputs.device)
        # where each wanted position lies among the rows (None: the rows are exactly the outputs)
        same = real.shape == index.shape and torch.equal(real, index)
        self.order = None if same else torch.searchsorted(index, real).to(outputs.device)

    def attend(self, q, k, v, dropout_p: float) -> torch.Tensor:
        """q: (R, H, D) at the rows, k and v: (E, H, D) for every token -> (R, H, D)."""
        out, start = [], 0
        for key_start, positions in self.docs:
            m, n = positions.shape[0], int(positions[-1]) + 1
            qd = q[start : start + m]
            kd, vd = k[key_start : key_start + n], v[key_start : key_start + n]
            start += m
            qd, kd, vd = (t.transpose(0, 1)[None] for t in (qd, kd, vd))
            if m == n or m == 1:  # every position from the start: plain causal; one query: sees every key
                y = F.scaled_dot_product_attention(qd, kd, vd, dropout_p=dropout_p, is_causal=m == n)
            else:  # the query at document position p sees keys 0 .. p
                mask = torch.arange(n, device=q.device) <= positions.to(q.device)[:, None]
                y = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, dropout_p=dropout_p)
            out.append(y[0].transpose(0, 1))
        return torch.cat(out)


def _compact_positions(outputs: torch.Tensor, n: int, keep: torch.Tensor | None) -> torch.Tensor:
    """Flat (B*T) positions -> positions among the real tokens; padding positions are an error."""
    if keep is None:
        return outputs
    compact = torch.full((n,), -1, dtype=torch.long)
    compact[keep.cpu()] = torch.arange(keep.shape[0])
    real = compact[outputs]
    if bool((real < 0).any()):
        raise ValueError("outputs include padding positions, which have no hidden state")
    return real


class FlexDocumentAttention:
    """FlexAttention with a block mask of "same document, not in the future": blocks with no
    allowed pair are skipped. Built on the device from doc_ids (no host sync); compiled on GPU.
    Forward only on CPU in torch 2.13 (no FlexAttention backward there)."""

    def __init__(self, doc_ids: torch.Tensor) -> None:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q_idx, kv_idx):
            return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)

        B, T = doc_ids.shape
        compiled = doc_ids.device.type == "cuda"
        self.block_mask = create_block_mask(same_document_causal, B, None, T, T, doc_ids.device, _compile=compiled)

    def drop_padding(self, t: torch.Tensor) -> torch.Tensor:
        return t  # runs on the rows as given: removing padding would need a host sync

    def restore_padding(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, q, k, v, dropout_p: float, layer: int = 0, kv_cache: KVCache | None = None):
        if dropout_p:
            raise UserError("FlexAttention has no attention dropout; use attention='documents' or 'dense'")
        y = _flex_attention(q.device.type)(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=self.block_mask)
        return y.transpose(1, 2)


def _flex_attention(device_type: str):
    """flex_attention, compiled into one fused kernel on GPU (eager is a slow reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED_FLEX
    if device_type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def packed_attention_kernel(device_type: str, attention_dropout: bool = False) -> str:
    """The kernel `attention_kernel="auto"` picks for packed rows: FlexAttention on GPU (it has no
    attention dropout), per-document SDPA elsewhere."""
    return "flex" if device_type == "cuda" and not attention_dropout else "documents"


_COMPILED_FLEX = None
Attention = DenseAttention | DocumentAttention | FlexDocumentAttention
ATTENTION_KERNELS = ("auto", "dense", "documents", "flex")


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


class GPT2(nn.Module):
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

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

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
        past = kv_cache.length if kv_cache is not None else 0
        if outputs is not None and kv_cache is not None:
            raise ValueError("outputs (selected positions) cannot be combined with a KV cache")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        # Checked on host tensors only: on a GPU, .max() would make the host wait for the device
        # every forward (training batches are checked when they are built).
        if position_ids.device.type == "cpu" and position_ids.max() >= self.config.n_positions:
            raise ValueError(f"position {int(position_ids.max())} exceeds the context of {self.config.n_positions}")
        attention = self.attention_for(B, T, past, doc_ids, attention_mask, kv_cache, input_ids.device)
        input_ids, position_ids = attention.drop_padding(input_ids), attention.drop_padding(position_ids)
        tokens = F.embedding(input_ids, self.wte.weight, sparse=True) if sparse_embedding_grad else self.wte(input_ids)
        x = self.drop(tokens + self.wpe(position_ids))
        # (not under torch.compile: the rows, read on the host, would recompile every batch)
        cut = outputs is not None and isinstance(attention, DocumentAttention) and not torch.compiler.is_compiling()
        for i, block in enumerate(self.h[:-1] if cut else self.h):
            x = self._block(block, x, attention, i, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if cut:
            rows = LastBlockRows(attention, outputs)
            x = self.ln_f(self._block(self.h[-1], x, attention, len(self.h) - 1, None, rows))
            return x if rows.order is None else x.index_select(0, rows.order)
        if outputs is not None:  # the final LayerNorm only where read
            return self.ln_f(x.flatten(0, -2).index_select(0, outputs))
        return attention.restore_padding(self.ln_f(x))

    def _block(self, block: Block, x, attention, layer: int, kv_cache, rows: LastBlockRows | None = None):
        """One block (at `rows` only, when given), under activation checkpointing when it is on."""
        if self.activation_checkpointing and self.training and kv_cache is None:
            return checkpoint(block, x, attention, layer, kv_cache, rows, use_reentrant=False)
        return block(x, attention, layer, kv_cache, rows)

    def attention_for(self, B, T, past, doc_ids, attention_mask, kv_cache, device) -> Attention:
        """The attention kernel of one forward pass: a packed kernel for packed rows, else the
        dense mask (plain causal when there is nothing to mask)."""
        packed = doc_ids is not None and attention_mask is None and kv_cache is None
        kernel = self._packed_kernel(device) if packed else "dense"
        if kernel == "documents":
            return DocumentAttention(doc_ids)
        if kernel == "flex":
            return FlexDocumentAttention(doc_ids)
        return DenseAttention(self._attention_mask(B, T, past, doc_ids, attention_mask, kv_cache, device))

    def _packed_kernel(self, device: torch.device) -> str:
        kernel = self.attention_kernel
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {kernel!r} is not one of {', '.join(ATTENTION_KERNELS)}")
        if kernel != "auto":
            return kernel
        if torch.compiler.is_compiling():
            return "dense"  # per-document lengths would recompile the graph for every batch
        return packed_attention_kernel(device.type, attention_dropout=self.training and self.config.dropout > 0)

    @staticmethod
    def _attention_mask(B, T, past, doc_ids, attention_mask, kv_cache, device):
        """A boolean (B, 1, T, past+T) mask, or None when plain causal attention is enough."""
        if attention_mask is None and doc_ids is None and past == 0:
            if kv_cache is not None:
                kv_cache.key_valid[:, :T] = True
            return None  # plain causal
        valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        if kv_cache is not None:
            kv_cache.key_valid[:, past : past + T] = valid
            keys = kv_cache.key_valid[:, : past + T]
        else:
            keys = valid
        q_pos = torch.arange(past, past + T, device=device)
        k_pos = torch.arange(past + T, device=device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None] & keys[:, None, :]
        if doc_ids is not None:
            if past:
                raise ValueError("doc_ids (packed rows) cannot be combined with a KV cache")
            mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
        # A query that sees no key at all (a padding position) would give NaN; let it see itself.
        mask = mask | (k_pos[None, :] == q_pos[:, None])[None]
        return mask[:, None]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.wte.weight
        return KVCache(self.config, batch, max_len, p.device, p.dtype)
