"""docs/config.md, generated from the config dataclasses, so the reference cannot drift from them.

    python -m qatune.config_docs [OUT]      # rewrites docs/config.md (or OUT)

Every field of TrainConfig and of every dataclass nested in it, with its type as written, its
default, and the comments that explain it: the comment lines right above the field and the one
beside it (read from the source, so the field comments stay the single source of truth; a
`# --- name` line starts a group of fields). Then which sections each method reads and the
defaults it fills in (`Method.resolve_config`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[2] / "docs" / "config.md"
COMMAND = "python -m qatune.config_docs"


@dataclasses.dataclass
class FieldDoc:
    name: str
    type: str
    default: object
    doc: str
    group: str = ""  # the `# --- name` group the field belongs to
    nested: type | None = None  # a dataclass documented in its own section


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """(line -> its comment's text, the lines that hold nothing but a comment)."""
    comments, alone = {}, set()
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comments[row] = tok.string.lstrip("#").strip()
            if not lines[row - 1][: tok.start[1]].strip():
                alone.add(row)
    return comments, alone


def _nested(tp) -> type | None:
    """The dataclass a field holds (directly or as `X | None`), if any."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return next((a for a in args if dataclasses.is_dataclass(a)), None)


def field_docs(cls: type) -> tuple[str, list[FieldDoc]]:
    """(the class's own docstring, its fields documented) from `cls`'s source."""
    source = textwrap.dedent(inspect.getsource(cls))
    node = ast.parse(source).body[0]
    comments, alone = _comments(source)
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    out, group, seen = [], "", 0
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        above, row = [], stmt.lineno - 1
        while row in alone and row > seen:  # the comment block right above, up to the previous field
            above.insert(0, comments[row])
            row -= 1
        headers = [c for c in above if c.startswith("---")]
        if headers:
            group = headers[-1].strip("- ")
            above = above[above.index(headers[-1]) + 1 :]
        beside = [comments[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments and r not in alone]
        seen = stmt.end_lineno
        f = defaults[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        annotation = ast.get_source_segment(source, stmt.annotation)
        doc = " ".join([*above, *beside])
        out.append(FieldDoc(name, annotation, default, doc, group, _nested(hints[name])))
    return ast.get_docstring(node) or "", out


def _cell(text: str) -> str:
    """Text in a table cell: a `|` would end the cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _prose(text: str) -> str:
    """Prose in a table cell: `<name>` would read as an HTML tag and vanish."""
    return _cell(text).replace("<", "&lt;").replace(">", "&gt;")


def _value(value) -> str:
    if dataclasses.is_dataclass(value):
        return "(section)"
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def sections(cls: type, path: str = "") -> list[tuple[str, type]]:
    """(dotted path, dataclass) of `cls` and every dataclass nested in it, depth first."""
    out = [(path, cls)]
    for f in field_docs(cls)[1]:
        if f.nested is not None:
            out += sections(f.nested, f"{path}.{f.name}" if path else f.name)
    return out


def render_section(path: str, cls: type) -> list[str]:
    doc, fields = field_docs(cls)
    title = f"`{path}`" if path else "top level"
    lines = [f"## {title}", "", f"`{cls.__module__}.{cls.__qualname__}`", ""]
    if doc:
        lines += [_prose(" ".join(doc.split())), ""]
    lines += ["| key | type | default | what it is |", "| --- | --- | --- | --- |"]
    group = ""
    for f in fields:
        if f.group != group:
            group = f.group
            lines.append(f"| **{_prose(group)}** | | | |")
        key = f"{path}.{f.name}" if path else f.name
        shown = f"`{key}`"
        if f.nested is not None:
            shown = f"[`{key}`](#{key.replace('.', '')})"
        lines.append(f"| {shown} | `{_cell(f.type)}` | `{_cell(_value(f.default))}` | {_prose(f.doc)} |")
    return [*lines, ""]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def method_lines() -> list[str]:
    from qatune.methods import METHODS, method_class
    from qatune.methods.config import TrainConfig

    lines = ["## Methods", "", "| `method:` | what it trains | its own sections | defaults it fills in |"]
    lines.append("| --- | --- | --- | --- |")
    for name in METHODS:
        cls = method_class(name)
        plain = TrainConfig(method=name)
        before, after = _flat(dataclasses.asdict(plain)), _flat(dataclasses.asdict(cls.resolve_config(plain)))
        filled = ", ".join(f"`{k}: {_value(after[k])}`" for k in after if after[k] != before.get(k)) or "none"
        own = ", ".join(f"[`{s}`](#{s})" for s in cls.config_sections) or "none"
        lines.append(f"| `{name}` | {_prose(cls.title)} | {own} | {_cell(filled)} |")
    lines += [
        "",
        "A run's `config.yaml` records these filled-in values, and `precision: auto` as the precision picked.",
        "",
    ]
    return lines


def render() -> str:
    from qatune.methods.config import TrainConfig

    lines = [
        "# Config reference",
        "",
        f"<!-- Generated by `{COMMAND}` from the config dataclasses and their field comments: edit those, "
        "then run it again (a test fails when this file is out of date). -->",
        "",
        "Every key `qatune train CONFIG.yaml [key=value …]` reads, with its default. Nested keys are written",
        "as sections in YAML or dotted on the command line (`optim.lr=3e-5`). Unknown keys are errors.",
        "",
        *method_lines(),
    ]
    for path, cls in sections(TrainConfig):
        lines += render_section(path, cls)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else OUT
    from qatune.utils.files import write_text_atomic

    write_text_atomic(out, render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
