"""Attention for every model family: the kernels, the KV cache, and the last block cut to the rows read.

A family's attention module projects q, k, v (and rotates them, for rotary families) and hands
them to one kernel per forward, picked by `attention_for`. Kernels take q as (B, T, heads,
head_dim) and k, v as (B, T, kv_heads, head_dim): with grouped-query attention (kv_heads <
heads) each key/value head serves heads / kv_heads query heads, which SDPA and FlexAttention
do themselves (`enable_gqa`), so keys and values are never copied per query head and the KV
cache holds kv_heads only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qatune.errors import UserError


class KVCache:
    """Preallocated keys/values for every layer; `length` tokens are filled so far.

    `key_valid` (B, max_len) marks which cached positions are real tokens (False on left padding),
    so that padded prompts never attend to their padding during decoding.
    """

    def __init__(self, config, batch: int, max_len: int, device, dtype) -> None:
        # any family's config: n_layer, n_kv_head (key/value heads: fewer than query heads with GQA), head_dim
        shape = (config.n_layer, batch, config.n_kv_head, max_len, config.head_dim)
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


# ---------------------------------------------------------------- attention kernels
# One forward picks one kernel for all layers (`attention_for`). Each takes q, k, v as
# (B, T, heads, head_dim) and returns q's shape. Packed rows (doc_ids) have three exact ways
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
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=_gqa(q, k))
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout_p, enable_gqa=_gqa(q, k))
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
        q, k, v = autocast_inputs(q, k, v)
        out = []
        for qd, kd, vd in zip(*(t[0].split(self.lengths) for t in (q, k, v))):
            # (n, H, D) -> (1, H, n, D): SDPA's CPU flash kernel wants 4-d inputs (3-d runs the
            # slower math path)
            qd, kd, vd = (t.transpose(0, 1) for t in (qd, kd, vd))  # (n, H, D) -> (H, n, D)
            out.append(document_causal(qd, kd, vd, dropout_p).transpose(0, 1))
        return torch.cat(out)[None]


def autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in autocast's dtype when autocast is on for their device (fp64 stays: autocast leaves it), else as given.

    SDPA is a lower-precision autocast op: under autocast it runs on exactly these casts. Done
    here, once for all documents, so that the kernel choice (`matmul_attention`) sees the dtype
    the attention really runs in: a rotary family's q and k can leave the rotation in the
    residual dtype (fp32 cos/sin: Qwen3's q/k norms, LoRA-adapted projections) while v, a
    linear's output, is already bf16."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    low = torch.get_autocast_dtype(device)
    return tuple(t.to(low) if t.is_floating_point() and t.dtype != torch.float64 else t for t in (q, k, v))


def document_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal attention over one document: q (H, n, D), k and v (kv heads, n, D) -> (H, n, D).

    In bf16/fp16 on a CPU, `CausalAttention` (scores by the matmul kernel): SDPA's CPU flash
    kernel reached 20-40 GFLOP/s there, 1.4-3x slower forward + backward at GPT-2's head shapes
    (benchmarks/step_profile.py; numbers in docs/performance.md). In fp32 the flash kernel is the
    faster one, and attention dropout needs SDPA."""
    if matmul_attention(q.device.type, q.dtype, dropout_p):
        return CausalAttention.apply(q, k, v)
    # SDPA's CPU flash kernel wants 4-d inputs (3-d runs the slower math path)
    y = F.scaled_dot_product_attention(
        q[None], k[None], v[None], dropout_p=dropout_p, is_causal=True, enable_gqa=_gqa(q[None], k[None])
    )
    return y[0]


def matmul_attention(device_type: str, dtype: torch.dtype, dropout_p: float = 0.0) -> bool:
    """Whether per-document attention runs `CausalAttention` (bf16/fp16 on a CPU, no dropout)."""
    return device_type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not dropout_p


# Query rows per block of `CausalAttention`: a block's scores cover the keys up to its last row
# only, so the masked upper triangle is mostly not computed (n = 512: 4 blocks, 62.5% of n^2).
# Smaller blocks skip more of it but run more, smaller matmuls.
CAUSAL_BLOCK = 128


class CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(D) + causal mask) v as batched matmuls, the scores and the softmax in
    fp32 (at least), the probabilities cast to v's dtype for the product with v (as the flash
    kernel does). Nothing n x n is kept for backward: the probabilities are recomputed there
    from q and k (one more q k^T), so memory stays that of q, k, v and the output.

    The query rows go in blocks of `CAUSAL_BLOCK` positions, each against the keys up to its own
    last position: the scores above the diagonal of the other blocks are never computed. A row's
    softmax sees all of its keys within its block, so blocking changes no result in exact
    arithmetic; in 16 bits, dk and dv are sums of per-block products each rounded once.

    Grouped-query attention without copies of k and v: the query heads sharing a key/value head
    are one batch entry of (group x rows) rows. q (H, n, D), k and v (kv heads, n, D)."""

    @staticmethod
    def forward(ctx, q, k, v, block: int = CAUSAL_BLOCK):
        out = torch.empty_like(q)
        q4, out4 = _grouped(q, k), _grouped(out, k)
        for start, end in _blocks(q.shape[1], block):
            p = _causal_probs(q4[:, :, start:end], k[:, :end], start)
            out4[:, :, start:end] = torch.bmm(p.to(v.dtype), v[:, :end]).view(out4[:, :, start:end].shape)
        ctx.save_for_backward(q, k, v, out)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out = ctx.saved_tensors
        kv_heads, n, d = k.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = torch.empty_like(q)
        dk, dv = (torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2))  # summed over blocks
        rows = (grad * out).sum(-1, dtype=acc)  # rowsum(P * dP) = rowsum(dO * O): n x D, not n x n, work
        q4, g4, r4, dq4 = _grouped(q, k), _grouped(grad, k), _grouped(rows[..., None], k), _grouped(dq, k)
        for start, end in _blocks(n, ctx.block):
            qb = q4[:, :, start:end].reshape(kv_heads, -1, d)
            gb = g4[:, :, start:end].reshape(kv_heads, -1, d)
            p = _causal_probs(qb, k[:, :end], start)  # (kv heads, group x rows, end)
            dv[:, :end] += torch.bmm(p.to(v.dtype).transpose(1, 2), gb)
            # softmax backward: dS = P * (dP - rowsum(P * dP)); the scores' 1/sqrt(D) goes onto dq and dk
            # dP - rowsum in fp32 (torch.sub promotes the 16-bit dP; an in-place sub_ would round it)
            dp = torch.bmm(gb, v[:, :end].transpose(1, 2))
            ds = p.mul_(torch.sub(dp, r4[:, :, start:end].reshape(kv_heads, -1, 1))).to(q.dtype)
            dq4[:, :, start:end] = torch.bmm(ds, k[:, :end]).mul_(d**-0.5).view(kv_heads, -1, end - start, d)
            dk[:, :end] += torch.bmm(ds.transpose(1, 2), qb).mul_(d**-0.5)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None


def _grouped(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(H, n, ...) as (kv heads, group, n, ...): the query heads that share each key/value head."""
    return t.view(k.shape[0], -1, *t.shape[1:])


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    """[start, end) of the query blocks of n positions: equal blocks of about `block` rows."""
    count = max(1, round(n / block))
    bounds = [n * i // count for i in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


def _causal_probs(q: torch.Tensor, k: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) in fp32 (at least) for the query positions start .. start
    + rows - 1 against the keys 0 .. start + rows - 1: q (kv heads, group, rows, D) or (kv heads,
    group x rows, D), k (kv heads, start + rows, D) -> (kv heads, group x rows, start + rows).
    The scale, the mask and the cast to fp32 in one pass over the scores."""
    kv_heads, n, d = k.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.bmm(q.reshape(kv_heads, -1, d), k.transpose(1, 2))
    rows = n - start
    future = torch.full((rows, n), float("-inf"), dtype=acc, device=q.device).triu_(start + 1)
    scores = torch.add(future, scores.view(kv_heads, -1, rows, n), alpha=d**-0.5)
    return torch.softmax(scores, dim=-1).view(kv_heads, -1, n)


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
                y = F.scaled_dot_product_attention(
                    qd, kd, vd, dropout_p=dropout_p, is_causal=m == n, enable_gqa=_gqa(qd, kd)
                )
            else:  # the query at document position p sees keys 0 .. p
                mask = torch.arange(n, device=q.device) <= positions.to(q.device)[:, None]
                y = F.scaled_dot_product_attention(
                    qd, kd, vd, attn_mask=mask, dropout_p=dropout_p, enable_gqa=_gqa(qd, kd)
                )
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
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = _flex_attention(q.device.type)(q, k, v, block_mask=self.block_mask, enable_gqa=_gqa(q, k))
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


def _gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Grouped-query attention: fewer key/value heads than query heads (dim 1 of (B, H, T, D))."""
    return q.shape[1] != k.shape[1]


def attention_for(kernel: str, attention_dropout: bool, B, T, past, doc_ids, attention_mask, kv_cache, device):
    """The attention kernel of one forward pass: a packed kernel for packed rows, else the dense
    mask (plain causal when there is nothing to mask). `kernel` is the model's `attention_kernel`;
    `attention_dropout`: dropout will be applied to attention probabilities in this forward."""
    packed = doc_ids is not None and attention_mask is None and kv_cache is None
    kernel = packed_kernel(kernel, device, attention_dropout) if packed else "dense"
    if kernel == "documents":
        return DocumentAttention(doc_ids)
    if kernel == "flex":
        return FlexDocumentAttention(doc_ids)
    return DenseAttention(causal_mask(B, T, past, doc_ids, attention_mask, kv_cache, device))


def packed_kernel(kernel: str, device: torch.device, attention_dropout: bool) -> str:
    """The kernel packed rows use: the one set, or for "auto" the device's default."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {', '.join(ATTENTION_KERNELS)}")
    if kernel != "auto":
        return kernel
    if torch.compiler.is_compiling():
        return "dense"  # per-document lengths would recompile the graph for every batch
    return packed_attention_kernel(device.type, attention_dropout=attention_dropout)


def causal_mask(B, T, past, doc_ids, attention_mask, kv_cache, device):
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


def run_blocks(model, blocks, x, attention, kv_cache, outputs, final_norm, *extra) -> torch.Tensor:
    """The blocks and the final norm of a forward, shared by every family: with `outputs` and
    per-document attention the last block runs at the rows read only (`LastBlockRows`).

    Each block is called as `block(x, attention, layer, kv_cache, rows, *extra)` (extra: what a
    family computes once per forward, e.g. the rotary cos/sin), under activation checkpointing
    when `model.activation_checkpointing` is on and the model is training."""
    T = x.shape[1]
    # (not under torch.compile: the rows, read on the host, would recompile every batch)
    cut = outputs is not None and isinstance(attention, DocumentAttention) and not torch.compiler.is_compiling()
    for i, block in enumerate(blocks[:-1] if cut else blocks):
        x = _block(model, block, x, attention, i, kv_cache, None, extra)
    if kv_cache is not None:
        kv_cache.length += T
    if cut:
        rows = LastBlockRows(attention, outputs)
        x = final_norm(_block(model, blocks[-1], x, attention, len(blocks) - 1, None, rows, extra))
        return x if rows.order is None else x.index_select(0, rows.order)
    if outputs is not None:  # the final norm only where read
        return final_norm(x.flatten(0, -2).index_select(0, outputs))
    return attention.restore_padding(final_norm(x))


def _block(model, block, x, attention, layer: int, kv_cache, rows, extra):
    """One block (at `rows` only, when given), under activation checkpointing when it is on."""
    if model.activation_checkpointing and model.training and kv_cache is None:
        return checkpoint(block, x, attention, layer, kv_cache, rows, *extra, use_reentrant=False)
    return block(x, attention, layer, kv_cache, rows, *extra)


def forward_positions(input_ids, position_ids, kv_cache, outputs, context: int):
    """(cached length, position ids) of a forward: 0..T-1 after the cache's length by default;
    positions at or beyond `context` are an error, checked on host tensors only (on a GPU, .max()
    would make the host wait for the device every forward; training batches are checked when
    they are built)."""
    B, T = input_ids.shape
    past = kv_cache.length if kv_cache is not None else 0
    if outputs is not None and kv_cache is not None:
        raise ValueError("outputs (selected positions) cannot be combined with a KV cache")
    if position_ids is None:
        position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
    # (not while torch.compile traces: a branch on a tensor's value would break the graph there)
    if position_ids.device.type == "cpu" and not torch.compiler.is_compiling() and position_ids.max() >= context:
        raise ValueError(f"position {int(position_ids.max())} exceeds the context of {context}")
    return past, position_ids


class DecoderLM(nn.Module):
    """What every model family shares around its own blocks: the attention kernel of a forward
    pass, the KV cache for generation, the parameter count. A family sets `config` (with `dropout`
    and what KVCache reads), `attention_kernel`, and the `head_weight` property."""

    attention_kernel = "auto"  # how packed rows attend: auto = FlexAttention on GPU, per-document SDPA on CPU

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Random init as GPT-2 and transformers' initializer_range do: N(0, 0.02) for every matrix
        and embedding, zero biases (norm weights keep their 1)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def attention_for(self, B, T, past, doc_ids, attention_mask, kv_cache, device) -> Attention:
        """The attention kernel of one forward pass (`attention_for` above)."""
        dropout = self.training and self.config.dropout > 0
        return attention_for(self.attention_kernel, dropout, B, T, past, doc_ids, attention_mask, kv_cache, device)

    def _packed_kernel(self, device: torch.device) -> str:
        return packed_kernel(self.attention_kernel, device, self.training and self.config.dropout > 0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.head_weight
        return KVCache(self.config, batch, max_len, p.device, p.dtype)
