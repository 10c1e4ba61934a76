"""Rollouts: sample responses with the KV-cache decoder and record, token by token, what RL needs.

At every decoding step the policy's logits at the last position give the next token (sampled at
`temperature`, optionally top-k / top-p filtered) and, from the same logits, the policy's
log-probability of that token and the entropy of its distribution; the reference model, run
side by side with its own KV cache on the same tokens, gives its log-probability; an optional
value head reads the policy's hidden state at the same position. So no second forward pass of
the policy is needed after sampling.

Log-probabilities are those of the temperature-scaled policy, softmax(logits / T), without the
top-k / top-p filters: the training step computes the same quantity (hidden / T through the LM
head), so the PPO ratio starts at 1. The filters only shape exploration.

A response's tokens include its EOS when the model stopped (stopping is an action the policy
takes and is rewarded for); after that, positions are masked. A response that reaches
`max_new_tokens` without EOS is cut there (`stopped_at_eos` False). "EOS" is any of the stop ids
given: with the model's own chat template also its end-of-turn token (`<|im_end|>`,
`qatune.data.encode.stop_ids`), which is what a chat model writes when its answer is done; the
first stop id pads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qatune.errors import UserError
from qatune.generation.sampling import Decoder, filter_logits, left_pad, room_for, sample_from, stop_list
from qatune.model.attention import DecoderLM
from qatune.model.families import context_length


@dataclass
class RolloutConfig:
    max_new_tokens: int = 32  # response tokens sampled at most (the prompt gets the rest of the context)
    temperature: float = 1.0  # > 0: RL needs a stochastic policy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise UserError(f"rollout.temperature must be > 0 for sampling, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise UserError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Rollout:
    """B sampled responses. Per-token tensors are (B, R), R = the longest response; positions past
    a response's end hold 0 and are False in `mask`."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # the stop id (EOS) included when the model stopped
    logprobs: torch.Tensor  # policy log-prob of each response token (fp32)
    ref_logprobs: torch.Tensor | None  # reference log-prob, when a reference was given
    entropy: torch.Tensor  # entropy of the policy's distribution at each step (nats)
    values: torch.Tensor | None  # value-head output at each step, when a value head was given
    mask: torch.Tensor  # (B, R) bool: real response tokens
    stopped_at_eos: list[bool]
    generated_tokens: int  # tokens sampled, EOS included (for generation tokens/s)

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-prob of `tokens` under softmax(logits / temperature), fp32. logits: (B, V)."""
    scaled = logits.float() / temperature
    return scaled.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def sample_step(
    logits: torch.Tensor, cfg: RolloutConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sampled token, its log-prob, the distribution's entropy) per row, from one log-softmax:
    over a 50,257-token vocabulary these full-width passes are most of a small model's decode step."""
    logp = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)
    probs = logp.exp()
    filtered = cfg.top_k or cfg.top_p < 1.0
    tok = sample_from(filter_logits(logp, cfg.top_k, cfg.top_p).softmax(-1) if filtered else probs, generator)
    entropy = -(probs * logp).sum(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1), entropy


@torch.no_grad()
def sample_rollout(
    policy: DecoderLM,
    prompts: list[list[int]],
    stop: int | Sequence[int],
    cfg: RolloutConfig,
    generator: torch.Generator,
    reference: DecoderLM | None = None,
    value_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast=None,
) -> Rollout:
    """Sample one response per prompt (repeat a prompt for a group) and record log-probs as above.

    stop: EOS, or several ids any of which ends a response (the first pads).
    reference: a model with the policy's interface (forward to hidden states, `lm_head`); under
        LoRA, the policy's own base with adapters off. value_head: maps hidden (B, d) -> (B,).
    autocast: a context-manager factory for mixed precision (the run's); log-probs are fp32.
    """
    was_training = policy.training
    policy.eval()
    if reference is not None:
        reference.eval()
    device = policy.head_weight.device
    stops = stop_list(stop)
    eos_id = stops[0]
    stop_ids = torch.tensor(stops, device=device)
    ids, mask = left_pad(prompts, eos_id, device)
    B, P = ids.shape
    max_new = room_for(P, cfg.max_new_tokens, context_length(policy.config))
    decoders = [Decoder(policy, ids, mask, max_new)]
    if reference is not None:
        decoders.append(Decoder(reference, ids, mask, max_new))
    tokens = torch.full((B, max_new), eos_id, dtype=torch.long, device=device)
    logprobs, ref_logprobs, entropy, values = (torch.zeros(B, max_new, device=device) for _ in range(4))
    alive = torch.ones(B, dtype=torch.bool, device=device)  # rows still generating
    live = torch.zeros(B, max_new, dtype=torch.bool, device=device)
    n = 0
    autocast = autocast or contextlib.nullcontext
    for n in range(max_new):
        with autocast():
            hidden = decoders[0].hidden()
            logits = policy.lm_head(hidden).float()
            ref_logits = reference.lm_head(decoders[1].hidden()).float() if reference is not None else None
            value = value_head(hidden).float() if value_head is not None else None
        tok, logprobs[:, n], entropy[:, n] = sample_step(logits, cfg, generator)
        tok = torch.where(alive, tok, torch.full_like(tok, eos_id))
        tokens[:, n], live[:, n] = tok, alive
        if ref_logits is not None:
            ref_logprobs[:, n] = token_logprobs(ref_logits, tok, cfg.temperature)
        if value is not None:
            values[:, n] = value
        alive &= ~torch.isin(tok, stop_ids)
        if not alive.any():
            break
        for d in decoders:
            d.append(tok)
    policy.train(was_training)
    width = n + 1
    live = live[:, :width]
    zero = lambda t: t[:, :width].masked_fill(~live, 0.0)
    response_ids = [tokens[i, : int(live[i].sum())].tolist() for i in range(B)]
    return Rollout(
        prompt_ids=[list(p) for p in prompts],
        response_ids=response_ids,
        logprobs=zero(logprobs),
        ref_logprobs=zero(ref_logprobs) if reference is not None else None,
        entropy=zero(entropy),
        values=zero(values) if value_head is not None else None,
        mask=live,
        stopped_at_eos=[bool(r) and r[-1] in stops for r in response_ids],
        generated_tokens=int(live.sum()),
    )
