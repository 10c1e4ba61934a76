"""The data pipeline in one call: sources -> records -> template -> ids and labels -> truncation.

from qatune.data.pipeline import DataConfig, load_examples
result = load_examples(DataConfig(sources=["train.jsonl"], template="alpaca"), tokenizer)
result.examples   # list[EncodedExample]
result.report     # DataReport: records, skipped, truncation counts; .to_dict(), .summary()
result.layouts    # {source: detected layout}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from qatune.data.encode import TURNS, Encoding, encode_records
from qatune.data.example import EncodedExample
from qatune.data.model_template import ModelTemplate
from qatune.data.preference.truncation import PAIR_POLICIES
from qatune.data.readers import ReadResult, read_records
from qatune.data.records import DataError
from qatune.data.report import DataReport, TruncationCounts
from qatune.data.templates import Template, bind_template, get_template
from qatune.data.truncation import POLICIES, apply, plan


@dataclass
class DataConfig:
    # files, folders, globs, save_to_disk folders, hub data sets ("name[:config][:split]"), or
    # mappings {hub: name, config, split, data_files, streaming, revision} / {path: folder, split}
    sources: list[str | dict] = field(default_factory=list)
    mapping: dict[str, str] | None = None  # e.g. {"prompt": "q", "response": "a"}; replaces layout detection
    # plain | raw | alpaca | chat | hh, model (the tokenizer's own Jinja chat template, see model_template.py),
    # or a template dict (see templates.py)
    template: str | dict = "plain"
    system_prompt: str | None = None  # system text for the chat template
    max_len: int = 1024
    # cut_response | drop | cut_prompt_left | cut_prompt_middle | error; preference pairs: cut_pair | drop | error
    truncation: str = "cut_response"
    train_on_turns: str = "all"  # all | last: which assistant turns of a conversation carry loss
    skip_bad: bool = False  # skip (and count) bad records instead of failing
    limit: int | None = None  # only the first N records

    def __post_init__(self):
        if isinstance(self.sources, (str, dict)):
            self.sources = [self.sources]
        if self.truncation not in (*POLICIES, *PAIR_POLICIES):
            known = ", ".join(dict.fromkeys((*POLICIES, *PAIR_POLICIES)))
            raise DataError(f"data.truncation: {self.truncation!r} is not one of {known}")
        if self.train_on_turns not in TURNS:
            raise DataError(f"data.train_on_turns: {self.train_on_turns!r} is not one of {', '.join(TURNS)}")
        if self.max_len < 2:
            raise DataError(f"data.max_len: {self.max_len} leaves no room for a prompt and a response")
        if self.limit is not None and self.limit < 0:
            raise DataError(f"data.limit: {self.limit} is negative")

    def get_template(self, tokenizer=None) -> Template | ModelTemplate:
        """The configured template; given the tokenizer, ready to render with it (`template: model`
        takes the tokenizer's chat template, `bind_template`)."""
        template = get_template(self.template, self.system_prompt)
        return bind_template(template, tokenizer) if tokenizer is not None else template


@dataclass
class LoadResult:
    examples: list[EncodedExample]
    report: DataReport
    layouts: dict[str, str]
    template: Template | ModelTemplate  # save `template.to_dict()` with the run, for generation


def read_and_encode(
    cfg: DataConfig, tokenizer, progress: Callable[[int], None] | None = None
) -> tuple[ReadResult, list[Encoding]]:
    """Records and their untruncated encodings (what `qatune stats` measures)."""
    if not cfg.sources:
        raise DataError("data.sources is empty: give at least one file, folder, glob or dataset name")
    read = read_records(cfg.sources, cfg.mapping, cfg.skip_bad, cfg.limit)
    if not read.records:
        skipped = f" ({read.skipped} skipped)" if read.skipped else ""
        raise DataError(f"no records in {', '.join(map(str, cfg.sources))}{skipped}")
    encodings = encode_records(read.records, cfg.get_template(), tokenizer, cfg.train_on_turns, progress=progress)
    return read, encodings


def load_examples(cfg: DataConfig, tokenizer, progress: Callable[[int], None] | None = None) -> LoadResult:
    if cfg.truncation not in POLICIES:
        known = ", ".join(POLICIES)
        raise DataError(f"data.truncation: {cfg.truncation!r} applies to preference pairs; use one of {known}")
    read, encodings = read_and_encode(cfg, tokenizer, progress)
    counts = TruncationCounts(cfg.truncation, cfg.max_len)
    examples = []
    for enc in encodings:
        outcome = plan(enc, cfg.truncation, cfg.max_len)
        example = apply(enc, outcome)
        counts.add(len(enc), enc.n_label_tokens, outcome, None if example is None else example.n_label_tokens)
        if example is not None:
            examples.append(example)
    report = DataReport(
        len(read.records), read.skipped, read.skip_reasons, counts, dict(read.layouts), read.warnings, read.notes
    )
    return LoadResult(examples, report, dict(read.layouts), cfg.get_template(tokenizer))
