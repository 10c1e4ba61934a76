"""The tokenized example, the unit everything downstream (stats, batching, training) works on."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # label of a token that carries no loss (prompt, user turns, padding)
# GPT-2's end-of-text token, which ends every trained response (the tokenizer checks it has it)
EOS_TEXT = "<|endoftext|>"


@dataclass
class EncodedExample:
    """One example as token ids, with `labels[i] == input_ids[i]` where token i is trained on
    (response tokens and their EOS) and IGNORE elsewhere. Labels are *not* shifted: the token at
    position i is predicted from positions < i; `shifted_targets` does the shift."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    def shifted_targets(self) -> list[int]:
        """targets[i] = the label of token i+1, so position i is trained to predict it. The last
        position has no next token within this example: in a packed row it must never be asked to
        predict the first token of the next example."""
        return self.labels[1:] + [IGNORE]
