"""Batched text generation with a KV cache: greedy, temperature, top-k, top-p, stop at EOS (or
any of several stop ids: a chat template's end-of-turn token, `qatune.data.encode.stop_ids`).

Prompts of different lengths are left-padded; padding is masked out of attention and positions
start at 0 at each prompt's first real token, so a padded prompt generates exactly what it would
alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qatune.errors import UserError
from qatune.generation.settings import SamplingConfig
from qatune.model.attention import DecoderLM
from qatune.model.families import context_length


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int]  # generated ids, the stop id excluded
    stopped_at_eos: bool  # ended by EOS or another stop id, not by max_new_tokens


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits: (B, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` (B, V), by inverting the cumulative distribution at a uniform
    draw: the first token whose cumulative mass exceeds it (never a zero-probability one). One
    cumsum and one search per row, several times faster on CPU than torch.multinomial
    (docs/performance.md, "Numbers behind the code's comments")."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    return sample_from(logits.softmax(-1), generator)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i} is empty; the model needs at least one token to condition on")
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class Decoder:
    """Feeds a left-padded batch through a model one new token at a time, with a KV cache.

    `hidden()` returns the last position's hidden state (B, d) after feeding every token not yet
    fed; `append(tokens)` adds one token per row. Positions start at 0 at each row's first real
    token and padding is masked out of attention, so a padded row decodes exactly as it would
    alone. Without the cache every call re-runs the whole sequence (slow; the reference the cached
    path is tested against). Shared by `generate_ids` and the RL rollouts, which run one decoder for
    the policy and one for the reference model side by side on the same tokens.
    """

    def __init__(self, model: DecoderLM, ids: torch.Tensor, mask: torch.Tensor, max_new: int, use_cache: bool = True):
        self.model = model
        self.ids, self.mask = ids, mask
        self.cache = model.new_kv_cache(ids.shape[0], ids.shape[1] + max_new) if use_cache else None
        self.fed = 0  # tokens of `ids` already in the cache

    def hidden(self) -> torch.Tensor:
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask = self.ids, self.mask
        if self.cache is not None and self.fed:
            ids, mask, positions = ids[:, self.fed :], mask[:, self.fed :], positions[:, self.fed :]
        hidden = self.model(ids, position_ids=positions, attention_mask=mask, kv_cache=self.cache)
        self.fed = self.ids.shape[1]
        return hidden[:, -1]

    def append(self, tokens: torch.Tensor) -> None:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens[:, None])], dim=1)


def room_for(prompt_width: int, max_new_tokens: int, context: int) -> int:
    """New tokens that fit after a prompt of `prompt_width` tokens; an error when none do."""
    max_new = min(max_new_tokens, context - prompt_width)
    if max_new <= 0:
        raise UserError(f"a prompt of {prompt_width} tokens leaves no room in the {context}-token context")
    return max_new


def stop_list(stop: int | Sequence[int]) -> list[int]:
    """One stop id or several, as a list whose first id is the one that pads."""
    return [stop] if isinstance(stop, int) else list(stop)


def first_stop(row: list[int], stops: list[int]) -> int | None:
    """Index of the first stop id in `row`, None when it has none."""
    return next((i for i, t in enumerate(row) if t in stops), None)


@torch.inference_mode()
def generate_ids(
    model: DecoderLM,
    prompts: list[list[int]],
    stop: int | Sequence[int],
    cfg: SamplingConfig,
    use_cache: bool = True,
    on_token: Callable[[list[int]], None] | None = None,
) -> list[Generation]:
    """Generate for a batch of token-id prompts. `stop`: EOS, or several ids any of which ends a
    row (EOS and a chat template's end-of-turn token); the first also pads. Without the cache,
    every step re-runs the full sequence (slow; kept as the reference the cached path is tested
    against). `on_token`, if given, receives each step's new token per row (the first stop id for
    rows already done), for streaming."""
    model.eval()
    stops = stop_list(stop)
    eos_id = stops[0]
    device = model.head_weight.device
    ids, mask = left_pad(prompts, eos_id, device)
    B, P = ids.shape
    max_new = room_for(P, cfg.max_new_tokens, context_length(model.config))
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    decoder = Decoder(model, ids, mask, max_new, use_cache)
    stop_ids = torch.tensor(stops, device=device)
    out = torch.full((B, max_new), eos_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(max_new):
        logits = model.lm_head(decoder.hidden()).float()
        tok = next_token(logits, cfg, generator)
        tok = torch.where(done, torch.full_like(tok, eos_id), tok)
        out[:, n] = tok
        if on_token is not None:
            on_token(tok.tolist())
        if cfg.stop_at_eos:
            done |= torch.isin(tok, stop_ids)
        if done.all():
            break
        decoder.append(tok)
    results = []
    for i, p in enumerate(prompts):
        row = out[i, : n + 1].tolist()
        end = first_stop(row, stops) if cfg.stop_at_eos else None
        results.append(Generation(p, row if end is None else row[:end], end is not None))
    return results
