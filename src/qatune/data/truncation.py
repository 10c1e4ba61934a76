"""Fitting an example into `max_len` tokens, under an explicit policy, with every outcome counted.

- cut_response (default): keep the whole prompt, cut the end of the response (its EOS is lost). The
  instruction is never cut: a cut instruction loses the task. An example whose
  prompt alone fills max_len has no room for a loss token and is dropped (counted as no_loss).
- drop: leave out every example longer than max_len.
- cut_prompt_left: keep the response, cut the prompt from the left (its start: the oldest context).
- cut_prompt_middle: keep the response and both ends of the prompt (instruction and question),
  cut the middle (typically a long passage).
- error: raise, naming the record.
For the cut_prompt policies the prompt keeps at least one token; a response that alone does not fit
is then cut too.
"""

from __future__ import annotations

from dataclasses import dataclass

from qatune.data.encode import Encoding
from qatune.data.example import IGNORE, EncodedExample
from qatune.data.records import DataError

POLICIES = ("cut_response", "drop", "cut_prompt_left", "cut_prompt_middle", "error")
DEFAULT_POLICY = "cut_response"
# Truncation that drops more than this share of the sample is a warning. Dropping is not random: it is
# the longest examples (long passages, long answers), so the run trains on a shifted set. Measured
# with cut_response and GPT-2's tokenizer: the t0 subset loses none at max_len 1024 and 3.5% at 512
# (long duorc/quoref passages); Vietnamese XQuAD loses 15.5-20% at 1024 depending on the template
# (a ~150-word passage is ~700 tokens there). Both have a policy that keeps every example.
DROP_WARN_SHARE = 0.02


@dataclass
class Outcome:
    keep: list[tuple[int, int]] | None  # kept [start, end) spans of the example; None = dropped
    truncated: bool = False
    no_loss: bool = False  # would have kept no loss token, so dropped
    eos_lost: bool = False  # the final answer's EOS was cut
    error: bool = False  # over max_len under the "error" policy (only when not raising)

    @property
    def dropped(self) -> bool:
        return self.keep is None


def plan(enc: Encoding, policy: str, max_len: int, raise_errors: bool = True) -> Outcome:
    """What `policy` does to `enc`, as spans to keep; no ids are copied (stats runs every policy)."""
    n, p = len(enc), enc.response_start
    if n <= max_len:
        return Outcome([(0, n)])
    if policy == "error":
        if raise_errors:
            raise DataError(
                f"{enc.where}: {n} tokens (prompt {p} + response {n - p}) exceed max_len {max_len} "
                f"(truncation=error); choose another truncation policy or a larger max_len"
            )
        return Outcome(None, error=True)
    if policy == "drop":
        return Outcome(None)
    if policy == "cut_response":
        keep = [(0, max_len)]
    elif policy in ("cut_prompt_left", "cut_prompt_middle"):
        keep_prompt = max(max_len - (n - p), min(p, 1))
        end = p + (max_len - keep_prompt)
        if policy == "cut_prompt_left":
            keep = [(p - keep_prompt, end)]
        else:
            head = (keep_prompt + 1) // 2
            keep = [(0, head), (p - (keep_prompt - head), end)]
    else:
        raise DataError(f"unknown truncation policy {policy!r}; one of {', '.join(POLICIES)}")
    if not any(b > max(a, p) for a, b in keep) and not has_label(enc, keep, p):
        return Outcome(None, no_loss=True, eos_lost=True)
    return Outcome(keep, truncated=True, eos_lost=keep[-1][1] < n)


def has_label(enc: Encoding, keep: list[tuple[int, int]], p: int) -> bool:
    """Labels before the final answer (earlier turns of a conversation) that survive the cut."""
    return any(enc.labels[i] != IGNORE for a, b in keep for i in range(a, min(b, p)))


def apply(enc: Encoding, outcome: Outcome) -> EncodedExample | None:
    if outcome.keep is None:
        return None
    if outcome.keep == [(0, len(enc))]:
        return EncodedExample(enc.input_ids, enc.labels, enc.source)
    ids: list[int] = []
    labels: list[int] = []
    for a, b in outcome.keep:
        ids += enc.input_ids[a:b]
        labels += enc.labels[a:b]
    return EncodedExample(ids, labels, enc.source)


def truncate(enc: Encoding, policy: str, max_len: int) -> tuple[EncodedExample | None, Outcome]:
    outcome = plan(enc, policy, max_len)
    return apply(enc, outcome), outcome


# Ties go to the first: the default when it is as good; then cut_prompt_middle, which keeps both ends
# of the prompt (the instruction at its start, the question at its end) and cuts the passage between.
KEEP_PREFERENCE = ("cut_response", "cut_prompt_middle", "cut_prompt_left", "drop")


def most_kept(kept: dict[str, int]) -> str:
    """The policy with the most examples kept, from {policy: kept}."""
    return max((p for p in KEEP_PREFERENCE if p in kept), key=lambda p: kept[p])


def best_policy(encodings: list[Encoding], max_len: int) -> tuple[str, int]:
    """The truncation policy that keeps the most of these examples, and how many."""
    kept = {p: sum(not plan(enc, p, max_len, raise_errors=False).dropped for enc in encodings) for p in KEEP_PREFERENCE}
    best = most_kept(kept)
    return best, kept[best]
