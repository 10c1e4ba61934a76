"""Counts of what reading and truncation did to the data: nothing is cut, dropped or skipped silently."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qatune.data.truncation import Outcome


@dataclass
class TruncationCounts:
    """The outcome of one truncation policy over a set of examples."""

    policy: str
    max_len: int
    examples_in: int = 0
    kept: int = 0  # examples out, truncated ones included
    truncated: int = 0  # kept, but shortened
    dropped: int = 0  # left out (no_loss ones included)
    no_loss: int = 0  # left out because no loss token would remain
    eos_lost: int = 0  # the final EOS was cut (truncated examples that no longer teach stopping)
    errors: int = 0  # over max_len under policy "error" (counted when stats asks, else raised)
    tokens_in: int = 0
    tokens_out: int = 0
    label_tokens_in: int = 0
    label_tokens_out: int = 0

    def add(self, n_tokens: int, n_labels: int, outcome: Outcome, labels_kept: int | None = None) -> None:
        self.examples_in += 1
        self.tokens_in += n_tokens
        self.label_tokens_in += n_labels
        self.no_loss += outcome.no_loss
        self.errors += outcome.error
        self.eos_lost += outcome.eos_lost and not outcome.dropped
        if outcome.dropped:
            self.dropped += 1
            return
        self.kept += 1
        self.truncated += outcome.truncated
        self.tokens_out += sum(b - a for a, b in outcome.keep)
        self.label_tokens_out += n_labels if labels_kept is None else labels_kept

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DataReport:
    """What `load_examples` did: records read and skipped, and the truncation outcome."""

    records: int
    skipped: int
    skip_reasons: list[str]
    truncation: TruncationCounts
    layouts: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # text fields left unread (see readers.py)
    notes: list[str] = field(default_factory=list)  # how files were interpreted

    def to_dict(self) -> dict:
        d = asdict(self)
        d["truncation"] = self.truncation.to_dict()
        return d

    def summary(self) -> str:
        t = self.truncation
        text = (
            f"{self.records} records -> {t.kept} examples (max_len {t.max_len}, truncation {t.policy}): "
            f"{t.truncated} truncated, {t.dropped} dropped ({t.no_loss} with no loss token left), "
            f"{t.eos_lost} lost their EOS"
        )
        if self.skipped:
            text += f"; {self.skipped} bad records skipped, e.g. {self.skip_reasons[0]}"
        return text

    def messages(self) -> list[str]:
        """Lines a user must see beside the summary: warnings first, then notes."""
        return [f"warning: {w}" for w in self.warnings] + [f"note: {n}" for n in self.notes]
