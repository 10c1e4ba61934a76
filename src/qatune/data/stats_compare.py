"""Tokenizers side by side on the same records and template (`qatune stats --compare-tokenizer`):
characters per token of each field, tokens per example as training sees them, and the share of
examples over max_len. A vocabulary trained on the data's language packs more characters into each
token, so the same max_len holds more of each example: measured on XQuAD-vi, Qwen2.5's vocabulary
spends about 3x fewer tokens than GPT-2's, and no example passes 1,024 tokens where GPT-2 puts one
in six over.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qatune.data.encode import Encoding
from qatune.data.records import Record
from qatune.data.stats import length_stats
from qatune.data.token_cost import token_cost


def display_name(location: str) -> str:
    """A column header: a folder's last part (`../shared/tokenizer/gpt2` -> `gpt2`), a name as given."""
    path = Path(location)
    return path.name if path.exists() and path.name else location


def tokenizer_summary(
    location: str,
    records: Sequence[Record],
    encodings: Sequence[Encoding],
    tokenizer,
    max_len: int,
    cost: dict[str, dict] | None = None,
) -> dict:
    """What one tokenizer makes of the records: field text cost (`token_cost`, computed unless
    given) and example lengths."""
    cost = cost if cost is not None else token_cost(records, tokenizer)
    chars = sum(c["chars"] for c in cost.values())
    tokens = sum(c["tokens"] for c in cost.values())
    lengths = length_stats(encodings, max_len)
    return {
        "tokenizer": location,
        "name": display_name(location),
        "vocab_size": len(tokenizer),
        "chars_per_token": {name: c["chars_per_token"] for name, c in cost.items()},
        "fields": {"chars": chars, "tokens": tokens, "chars_per_token": chars / tokens if tokens else None},
        "tokens_per_example": lengths["total_tokens"],
        "over_max_len": lengths["over_max_len"],
    }


def with_ratios(summaries: list[dict]) -> list[dict]:
    """Each summary with `fewer_tokens_than_first`: the first tokenizer's tokens over this one's, for
    the field text alone (`fields`) and for whole examples with template and EOS (`examples`)."""
    first = summaries[0]
    out = []
    for s in summaries:
        out.append(
            {
                **s,
                "fewer_tokens_than_first": {
                    "fields": ratio(first["fields"]["tokens"], s["fields"]["tokens"]),
                    "examples": ratio(first["tokens_per_example"]["sum"], s["tokens_per_example"]["sum"]),
                },
            }
        )
    return out


def ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def comparison_table(summaries: list[dict], max_len: int):
    """(title, header, rows): one column per tokenizer, one row per measure."""

    def cpt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    def times(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    fields = list(dict.fromkeys(f for s in summaries for f in s["chars_per_token"]))
    rows = [["vocabulary size", *(f"{s['vocab_size']:,}" for s in summaries)]]
    rows += [[f"chars/token: {f}", *(cpt(s["chars_per_token"].get(f)) for s in summaries)] for f in fields]
    rows.append(["chars/token: all fields", *(cpt(s["fields"]["chars_per_token"]) for s in summaries)])
    for key, label in (("mean", "mean"), ("median", "median"), ("p99", "p99"), ("max", "max")):
        rows.append([f"tokens per example, {label}", *(f"{s['tokens_per_example'][key]:,.1f}" for s in summaries)])
    rows.append(
        [
            f"examples over max_len {max_len}",
            *(f"{s['over_max_len']['count']:,} ({100 * s['over_max_len']['share']:.1f}%)" for s in summaries),
        ]
    )
    first = summaries[0]["name"]
    for key, label in (("fields", "field text"), ("examples", "whole examples")):
        shown = [times(s["fewer_tokens_than_first"][key]) for s in summaries]
        rows.append([f"fewer tokens than {first}, {label}", *shown])
    return "Tokenizers side by side", ["", *(s["name"] for s in summaries)], rows
