"""Continuous batching: generation requests join and leave one running batch on a shared KV cache.

A server answers requests that arrive at any time. Generating them one after another leaves the
hardware idle (one token of one request per forward pass); waiting to fill fixed batches delays
everyone. Here every decode step advances all running sequences by one token; a new sequence is
prefilled on its own and joins the batch at the next step; a finished one leaves at once and its
row goes to the next in line (the scheduling of Orca, Yu et al. 2022, and vLLM).

The cache layout needs no change to the model. All rows share one column pointer (`length`): at
every step each running row writes its new key/value at that column. A row's own tokens are one
contiguous span ending there; columns before its start are masked out (`key_valid`), and its
positions are its own (0 at its first prompt token). So a row joining with a P-token prompt has its
prompt's keys/values copied to the P columns just before the pointer. When the pointer reaches the
end of the cache, all spans move left by the start of the oldest one; the width (1.25 x the
context) guarantees that this frees at least a quarter of a context, so moves are rare. Running
rows are kept packed at the top of the cache, so a step computes only on them.

Every sequence samples with its own settings and its own seeded generator, so its tokens do not
depend on which other sequences share its batch (up to float rounding of different batch shapes,
as in `generate_ids`).
"""

from __future__ import annotations

import copy
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qatune.generation.sampling import SamplingConfig, next_token
from qatune.generation.textstream import TextStream
from qatune.model.attention import DecoderLM, KVCache
from qatune.model.families import context_length


class QueueFull(RuntimeError):
    """More sequences are waiting than the batcher accepts; the caller should retry later."""


@dataclass
class Output:
    """What a sequence produced since its last output. `finish_reason` is None while it runs, then
    "stop" (a stop id: EOS or the chat template's end of turn; or a stop string), "length"
    (max_new_tokens reached) or "error" (see `error`)."""

    text: str
    tokens: int  # tokens generated so far, EOS included
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One generation: a prompt, its sampling settings and stop strings, and where its outputs go
    (`emit` is called from the thread that runs the batcher)."""

    prompt: list[int]
    sampling: SamplingConfig
    emit: Callable[[Output], None]
    stops: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    start: int = 0  # first cache column of this row's span, while running
    stream: TextStream | None = None
    generator: torch.Generator | None = None

    @property
    def position(self) -> int:
        """Position of the last sampled token, the one the next decode step feeds."""
        return len(self.prompt) + len(self.tokens) - 1


def rows_view(cache: KVCache, n: int) -> KVCache:
    """The first `n` rows of `cache` as a cache of batch `n` that shares its storage."""
    view = copy.copy(cache)
    view.k, view.v, view.key_valid = cache.k[:, :n], cache.v[:, :n], cache.key_valid[:n]
    return view


class ContinuousBatcher:
    """Runs sequences submitted from any thread; `step` (one scheduling iteration) and
    `serve_forever` run on one thread of their own."""

    def __init__(
        self,
        model: DecoderLM,
        tokenizer,
        max_batch: int = 8,
        max_waiting: int = 64,
        context: int | None = None,
        stop_ids: list[int] | None = None,
    ) -> None:
        """context: the most tokens (prompt + generated) one sequence may hold; the model's own by
        default, never more. The cache holds max_batch x 1.25 x context keys and values.
        stop_ids: the ids that end a sequence (never part of its text): EOS by default; EOS and the
        chat template's end-of-turn token for a model trained on it (`qatune.data.encode.stop_ids`)."""
        if max_batch < 1 or max_waiting < 0:
            raise ValueError(f"max_batch must be >= 1 and max_waiting >= 0, got {max_batch} and {max_waiting}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids if stop_ids is not None else [tokenizer.eos_token_id])
        self.context = min(context or context_length(model.config), context_length(model.config))
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.width = self.context + max(1, self.context // 4)
        self.cache = model.new_kv_cache(max_batch, self.width)
        self.device = model.head_weight.device
        self.running: list[Sequence] = []  # running[i] lives in cache row i
        self.waiting: deque[Sequence] = deque()
        self.wakeup = threading.Condition()
        self.stats = {"steps": 0, "tokens": 0, "prefills": 0, "moves": 0, "errors": 0}

    # --- called from any thread -------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); QueueFull when they would exceed `max_waiting`."""
        for s in seqs:
            if not s.prompt or len(s.prompt) + s.sampling.max_new_tokens > self.context:
                raise ValueError(
                    f"a prompt of {len(s.prompt)} tokens plus {s.sampling.max_new_tokens} new ones does not fit "
                    f"the {self.context}-token context (the prompt needs at least one token)"
                )
        with self.wakeup:
            if len(self.waiting) + len(seqs) > self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (at most {self.max_waiting})")
            self.waiting.extend(seqs)
            self.wakeup.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence (its client left); its row is freed at the next step."""
        seq.cancelled = True

    def load(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), **self.stats}

    def serve_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self.wakeup:
                if not self.running and not self.waiting:
                    self.wakeup.wait(timeout=0.1)
            self.step()

    def wake(self) -> None:
        with self.wakeup:
            self.wakeup.notify()

    # --- the scheduling iteration -----------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled sequences, admit waiting ones (prefill), then decode one token for every
        running sequence. An unexpected error (a bug, out of memory) ends the sequences in flight
        with an error output instead of stopping the batcher: the server keeps serving."""
        admitted: list[Sequence] = []
        try:
            self._drop_cancelled()
            admitted = self._admit()
            while admitted:
                self._prefill(admitted[0])
                admitted.pop(0)
            if self.running:
                self._decode()
        except Exception as e:
            self.stats["errors"] += 1
            for seq in self.running + admitted:
                if not seq.cancelled:
                    seq.emit(Output("", len(seq.tokens), "error", f"{type(e).__name__}: {e}"))
            self.running = []
            self.cache.length = 0

    def _admit(self) -> list[Sequence]:
        admitted = []
        with self.wakeup:
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                seq = self.waiting.popleft()
                if not seq.cancelled:
                    admitted.append(seq)
        return admitted

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.running))):
            if self.running[i].cancelled:
                self._remove(i)

    def _prefill(self, seq: Sequence) -> None:
        """Run the prompt alone (exactly as `generate_ids` does for one prompt), sample the first
        token, and, unless that already ends it, copy its keys/values into the batch."""
        seq.stream = TextStream(self.tokenizer, seq.stops)
        if seq.sampling.temperature > 0:
            seed = seq.sampling.seed if seq.sampling.seed is not None else random.SystemRandom().randrange(2**63)
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        P = len(seq.prompt)
        ids = torch.tensor([seq.prompt], device=self.device)
        mask = torch.ones_like(ids)
        own = self.model.new_kv_cache(1, P)
        hidden = self.model(ids, position_ids=mask.cumsum(-1) - 1, attention_mask=mask, kv_cache=own)
        self.stats["prefills"] += 1
        [token] = self._sample(self.model.lm_head(hidden[:, -1]).float(), [seq])
        if self._advance(seq, token):
            return
        self._make_room(P)
        row, end = len(self.running), self.cache.length
        self.cache.k[:, row, :, end - P : end] = own.k[:, 0]
        self.cache.v[:, row, :, end - P : end] = own.v[:, 0]
        self.cache.key_valid[row] = False
        self.cache.key_valid[row, end - P : end] = True
        seq.start = end - P
        self.running.append(seq)

    def _decode(self) -> None:
        if self.cache.length == self.width:
            self._move(-min(s.start for s in self.running))
        n = len(self.running)
        ids = torch.tensor([[s.tokens[-1]] for s in self.running], device=self.device)
        positions = torch.tensor([[s.position] for s in self.running], device=self.device)
        view = rows_view(self.cache, n)
        hidden = self.model(ids, position_ids=positions, attention_mask=torch.ones_like(ids), kv_cache=view)
        self.cache.length = view.length
        tokens = self._sample(self.model.lm_head(hidden[:, -1]).float(), self.running)
        self.stats["steps"] += 1
        finished = [i for i, (s, t) in enumerate(zip(self.running, tokens)) if self._advance(s, t)]
        for i in reversed(finished):
            self._remove(i)

    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Greedy rows in one argmax; every sampling row with its own settings and generator."""
        tokens = logits.argmax(-1)
        for i, s in enumerate(seqs):
            if s.sampling.temperature > 0:
                tokens[i] = next_token(logits[i : i + 1], s.sampling, s.generator)[0]
        return tokens.tolist()

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Record a sampled token, emit the text it completes; True when the sequence is done."""
        seq.tokens.append(token)
        self.stats["tokens"] += 1
        eos = seq.sampling.stop_at_eos and token in self.stop_ids
        text = "" if eos else seq.stream.push(token)
        if eos or seq.stream.stopped:
            reason = "stop"
        elif len(seq.tokens) >= seq.sampling.max_new_tokens:
            reason = "length"
        else:
            reason = None
        if reason is not None:
            text += seq.stream.finish()
        if (text or reason) and not seq.cancelled:
            seq.emit(Output(text, len(seq.tokens), reason))
        return reason is not None

    # --- cache bookkeeping ------------------------------------------------------------------

    def _make_room(self, prompt_len: int) -> None:
        """Make sure `prompt_len` columns exist before the pointer for a joining row."""
        if not self.running:
            self.cache.length = prompt_len  # nothing to keep
        elif self.cache.length < prompt_len:
            self._move(prompt_len - self.cache.length)

    def _move(self, shift: int) -> None:
        """Move every running row's span `shift` columns (left when negative)."""
        n, length = len(self.running), self.cache.length
        src = slice(max(0, -shift), length)
        dst = slice(max(0, shift), length + shift)
        for t in (self.cache.k, self.cache.v):
            t[:, :n, :, dst] = t[:, :n, :, src].clone()
        self.cache.key_valid[:n, dst] = self.cache.key_valid[:n, src].clone()
        if shift > 0:
            self.cache.key_valid[:n, :shift] = False
        self.cache.length = length + shift
        for s in self.running:
            s.start += shift
        self.stats["moves"] += 1

    def _remove(self, i: int) -> None:
        """Free row i: the last running row moves into it, so running rows stay packed."""
        last = len(self.running) - 1
        if i != last:
            end = self.cache.length
            self.cache.k[:, i, :, :end] = self.cache.k[:, last, :, :end]
            self.cache.v[:, i, :, :end] = self.cache.v[:, last, :, :end]
            self.cache.key_valid[i] = self.cache.key_valid[last]
            self.running[i] = self.running[last]
        self.running.pop()
        if not self.running:
            self.cache.length = 0
