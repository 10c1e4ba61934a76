"""Generated token ids -> text, one token at a time, with stop strings.

Two things make this more than `tokenizer.decode` per token:

- GPT-2's byte-level tokens can split one character (an emoji, a letter with two diacritics)
  across tokens. Ids are decoded in groups that end on a whole character, so no half-made
  character is ever sent, and the pieces join to exactly `tokenizer.decode(all_ids)`.
- Stop strings (OpenAI's `stop`) end the text before their first occurrence, and the text they
  would cut is never sent: while the end of the text could still be the start of a stop string,
  that end is held back.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decoding gives for an incomplete UTF-8 sequence


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could be the start of a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


class TextStream:
    """The text of one generation as its tokens arrive. `push` returns the text that is now safe
    to show; `finish` returns the rest. `stopped` is set once a stop string has ended the text."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.pending: list[int] = []  # ids whose text does not end on a whole character yet
        self.text = ""  # all text decoded so far (cut at a stop string once one appears)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith(REPLACEMENT):
            return ""
        self.pending = []
        self._append(piece)
        return self._take(final=self.stopped)

    def finish(self) -> str:
        """Decode what is still pending (a cut character stays a replacement character, as in
        `tokenizer.decode`) and return all text not yet sent."""
        if self.pending and not self.stopped:
            self._append(self.tokenizer.decode(self.pending))
        self.pending = []
        return self._take(final=True)

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - self.longest_stop + 1)  # a stop may begin in earlier text
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - held_back(self.text, self.stops)
        if end <= self.sent:
            return ""
        out = self.text[self.sent : end]
        self.sent = end
        return out
