"""Fitting a preference pair into max_len tokens per sequence, with every outcome counted.

Both sequences (prompt + chosen, prompt + rejected) must fit max_len. Policies:

- cut_pair (default): keep the prompt's end and both responses' starts. The responses keep
  max(max_len - prompt, min(longer response, max_len // 2)) tokens: a long prompt is cut from the
  left (its oldest turns go first; the last question stays) while the responses fit whole; long
  responses are cut at the end while the whole prompt fits; when both are long, each gets half.
  Where a cut leaves the two responses identical, the pair teaches nothing and is dropped.
- drop: leave out every pair whose longer sequence exceeds max_len.
- error: raise, naming the record.

`cut_response`, the SFT default, reads as cut_pair: it is what cut_pair does to the responses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qatune.data.preference.encode import EncodedPair
from qatune.data.records import DataError

PAIR_POLICIES = ("cut_pair", "drop", "error")
DEFAULT_PAIR_POLICY = "cut_pair"
SFT_ONLY = ("cut_prompt_left", "cut_prompt_middle")


def pair_policy(name: str) -> str:
    """The pair policy a data.truncation setting means."""
    if name == "cut_response":
        return DEFAULT_PAIR_POLICY
    if name not in PAIR_POLICIES:
        raise DataError(
            f"data.truncation: {name!r} does not apply to preference pairs; use one of {', '.join(PAIR_POLICIES)}"
        )
    return name


@dataclass
class PairOutcome:
    keep_prompt: int = 0  # tokens kept from the prompt's end
    keep_response: int | None = None  # tokens kept from each response's start; None = all
    dropped: bool = False
    prompt_cut: bool = False
    responses_cut: bool = False
    eos_lost: bool = False  # a cut response lost its EOS
    identical: bool = False  # dropped: the cut left both responses the same
    error: bool = False  # over max_len under "error" (when not raising)

    @property
    def truncated(self) -> bool:
        return not self.dropped and (self.prompt_cut or self.responses_cut)


def plan_pair(pair: EncodedPair, policy: str, max_len: int, raise_errors: bool = True) -> PairOutcome:
    P, L = len(pair.prompt_ids), max(len(pair.chosen_ids), len(pair.rejected_ids))
    if pair.longest <= max_len:
        return PairOutcome(keep_prompt=P)
    if policy == "error":
        if raise_errors:
            raise DataError(
                f"{pair.where}: prompt {P} + longer response {L} tokens exceed max_len {max_len} "
                "(truncation=error); choose cut_pair or drop, or a larger max_len"
            )
        return PairOutcome(dropped=True, error=True)
    if policy == "drop":
        return PairOutcome(dropped=True)
    if policy != "cut_pair":
        raise DataError(f"unknown pair truncation policy {policy!r}; one of {', '.join(PAIR_POLICIES)}")
    keep_prompt, room = cut_lengths(P, L, max_len)
    chosen, rejected = pair.chosen_ids[:room], pair.rejected_ids[:room]
    outcome = PairOutcome(
        keep_prompt=keep_prompt,
        keep_response=room,
        prompt_cut=keep_prompt < P,
        responses_cut=room < L,
        eos_lost=room < L,  # the longer response lost its end, EOS included
    )
    if chosen == rejected:
        outcome.dropped = outcome.identical = True
    return outcome


def cut_lengths(prompt: int, response: int, max_len: int) -> tuple[int, int]:
    """cut_pair's rule for a prompt of `prompt` tokens before responses of at most `response`:
    (tokens kept from the prompt's end, tokens kept from each response's start)."""
    room = max(max_len - prompt, min(response, max_len // 2))
    return min(prompt, max_len - room), room


def apply_pair(pair: EncodedPair, outcome: PairOutcome) -> EncodedPair | None:
    if outcome.dropped:
        return None
    if not outcome.truncated:
        return pair
    room = outcome.keep_response
    return EncodedPair(
        pair.prompt_ids[len(pair.prompt_ids) - outcome.keep_prompt :],
        pair.chosen_ids[:room],
        pair.rejected_ids[:room],
        pair.source,
        pair.where,
        pair.margin,
    )


@dataclass
class PairTruncationCounts:
    """The outcome of one pair policy over a set of pairs."""

    policy: str
    max_len: int
    pairs_in: int = 0
    kept: int = 0
    truncated: int = 0  # kept, but shortened
    prompt_cut: int = 0
    responses_cut: int = 0
    eos_lost: int = 0
    dropped: int = 0
    identical_after_cut: int = 0  # dropped: the cut made both responses the same
    errors: int = 0
    tokens_in: int = 0  # both sequences
    tokens_out: int = 0
    response_tokens_in: int = 0  # both responses: what the loss sees
    response_tokens_out: int = 0

    def add(self, pair: EncodedPair, outcome: PairOutcome) -> None:
        responses = len(pair.chosen_ids) + len(pair.rejected_ids)
        self.pairs_in += 1
        self.tokens_in += pair.n_tokens
        self.response_tokens_in += responses
        self.errors += outcome.error
        self.identical_after_cut += outcome.identical
        if outcome.dropped:
            self.dropped += 1
            return
        self.kept += 1
        self.truncated += outcome.truncated
        self.prompt_cut += outcome.prompt_cut
        self.responses_cut += outcome.responses_cut
        self.eos_lost += outcome.eos_lost
        room = outcome.keep_response
        if room is not None:
            responses = min(len(pair.chosen_ids), room) + min(len(pair.rejected_ids), room)
        kept_responses = responses
        self.response_tokens_out += kept_responses
        self.tokens_out += 2 * outcome.keep_prompt + kept_responses

    def to_dict(self) -> dict:
        return asdict(self)
