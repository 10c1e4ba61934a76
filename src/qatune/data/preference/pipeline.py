"""The preference data pipeline in one call: sources -> pairs -> ids -> truncation, counted.

result = load_pairs(DataConfig(sources=["hh.jsonl"], template="hh", max_len=512), tokenizer)
result.pairs     # list[EncodedPair]
result.report    # PairDataReport: read, skipped, identical pairs dropped, truncation counts
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from qatune.data.model_template import ModelTemplate
from qatune.data.pipeline import DataConfig
from qatune.data.preference.encode import EncodedPair, encode_pairs
from qatune.data.preference.records import PairReadResult, PreferenceRecord, read_pairs
from qatune.data.preference.truncation import PairTruncationCounts, apply_pair, pair_policy, plan_pair
from qatune.data.records import DataError
from qatune.data.templates import Template


@dataclass
class PairDataReport:
    records: int  # pairs read
    skipped: int  # bad rows left out (data.skip_bad)
    skip_reasons: list[str]
    identical: int  # chosen == rejected: nothing to prefer, dropped
    identical_where: list[str]  # the first few of them
    truncation: PairTruncationCounts
    layouts: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["truncation"] = self.truncation.to_dict()
        return d

    def summary(self) -> str:
        t = self.truncation
        text = (
            f"{self.records} pairs -> {t.kept} (max_len {t.max_len}, truncation {t.policy}): {t.truncated} truncated "
            f"({t.prompt_cut} prompts cut at the start, {t.responses_cut} with responses cut, {t.eos_lost} lost "
            f"an EOS), {t.dropped} dropped ({t.identical_after_cut} identical once cut)"
        )
        if self.identical:
            text += f"; {self.identical} pairs with identical responses dropped, e.g. {self.identical_where[0]}"
        if self.skipped:
            text += f"; {self.skipped} bad records skipped, e.g. {self.skip_reasons[0]}"
        return text


@dataclass
class PairLoadResult:
    pairs: list[EncodedPair]
    report: PairDataReport
    layouts: dict[str, str]
    template: Template | ModelTemplate


def read_distinct(cfg: DataConfig) -> tuple[PairReadResult, list[PreferenceRecord], list[str]]:
    """The pairs of cfg's sources, and those whose responses are identical (left out, by place)."""
    if not cfg.sources:
        raise DataError("data.sources is empty: give at least one file, folder, glob or dataset name")
    read = read_pairs(cfg.sources, cfg.mapping, cfg.skip_bad, cfg.limit)
    if not read.pairs:
        skipped = f" ({read.skipped} skipped)" if read.skipped else ""
        raise DataError(f"no preference pairs in {', '.join(cfg.sources)}{skipped}")
    identical = [r.where for r in read.pairs if r.chosen.strip() == r.rejected.strip()]
    distinct = [r for r in read.pairs if r.chosen.strip() != r.rejected.strip()]
    return read, distinct, identical


def load_pairs(cfg: DataConfig, tokenizer) -> PairLoadResult:
    policy = pair_policy(cfg.truncation)
    template = cfg.get_template(tokenizer)  # `model`: the tokenizer's chat template, bound
    read, distinct, identical = read_distinct(cfg)
    counts = PairTruncationCounts(policy, cfg.max_len)
    pairs = truncate_all(encode_pairs(distinct, template, tokenizer), policy, cfg.max_len, counts)
    report = PairDataReport(
        len(read.pairs), read.skipped, read.skip_reasons, len(identical), identical[:5], counts, dict(read.layouts)
    )
    return PairLoadResult(pairs, report, dict(read.layouts), template)


def truncate_all(
    encoded: Sequence[EncodedPair], policy: str, max_len: int, counts: PairTruncationCounts
) -> list[EncodedPair]:
    out = []
    for pair in encoded:
        outcome = plan_pair(pair, policy, max_len)
        counts.add(pair, outcome)
        kept = apply_pair(pair, outcome)
        if kept is not None:
            out.append(kept)
    return out
