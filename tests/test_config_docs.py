"""docs/config.md is generated from the config dataclasses: it lists every key with its type,
default and comment, every method, and it is what the generator writes today."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from qatune.config_docs import COMMAND, field_docs, render, sections
from qatune.methods import METHODS
from qatune.methods.config import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_docs_config_md_is_what_the_generator_writes():
    assert DOC.read_text(encoding="utf-8") == render(), (
        f"docs/config.md is out of date with the config dataclasses: rewrite it with `PYTHONPATH=src {COMMAND}`"
    )


def test_every_key_and_every_method_is_listed():
    text = render()
    for path, cls in sections(TrainConfig):
        for f in dataclasses.fields(cls):
            key = f"{path}.{f.name}" if path else f.name
            assert f"`{key}`" in text, key
    for name in METHODS:
        assert f"| `{name}` |" in text, name
    assert "`rl.group_size: 8`" in text  # what grpo fills in
    assert "`data.truncation: cut_pair`" in text  # what dpo and reward fill in


@dataclass
class _Example:
    """An example section."""

    # A comment above,
    # on two lines.
    first: int = 1  # and one beside
    # --- a group
    second: str | None = None  # beside only | with a bar
    third: list[int] = field(default_factory=lambda: [1, 2])


def test_a_field_doc_joins_the_comments_above_and_beside_it():
    doc, fields = field_docs(_Example)
    assert doc == "An example section."
    by_name = {f.name: f for f in fields}
    assert by_name["first"].doc == "A comment above, on two lines. and one beside"
    assert by_name["second"].doc == "beside only | with a bar" and by_name["second"].group == "a group"
    assert by_name["second"].type == "str | None"
    assert by_name["third"].default == [1, 2] and by_name["third"].doc == ""
