"""Reading records from JSON, JSONL, CSV and Parquet files (one, several, a folder or a glob), from
`save_to_disk` folders and from Hugging Face data sets, with the layout detected per source.

    result = read_records(["data/*.jsonl", "hf:tatsu-lab/alpaca:train"], mapping=None, skip_bad=False)
    for record in result: ...          # Record(source, where, prompt, response, context, messages)
    result.layouts                     # {"data/a.jsonl": "prompt_completion", ...}
    result.skipped, result.skip_reasons
    result.warnings                    # text fields the layout does not use, once per file, counted
    result.notes                       # how a file was read when that was a choice (a JSON table ...)

Every error names the file, the line or record, and the field. With `skip_bad`, bad rows are
counted and the first few reasons kept instead; a file that cannot be opened or decoded as a whole
(or has an unknown layout) is an error either way. Sources are described in `sources.py`.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qatune.data.hf_datasets import disk_rows, hub_rows
from qatune.data.layouts import detect_layout, fields_used, to_records, unused_field_warning, unused_text_fields
from qatune.data.records import DataError, Record
from qatune.data.sources import (
    FILE_SUFFIXES,
    HF_PREFIX,
    DiskSource,
    HubSource,
    Source,
    display_name,
    expand_sources,
    looks_like_path,
)

__all__ = ["FILE_SUFFIXES", "HF_PREFIX", "ReadResult", "display_name", "expand_sources", "looks_like_path"]
MAX_REASONS = 5  # skip reasons kept for the report


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    layouts: dict[str, str] = field(default_factory=dict)  # source -> detected layout
    skipped: int = 0  # bad rows left out (skip_bad)
    skip_reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS of them
    warnings: list[str] = field(default_factory=list)  # text the layout leaves unread, per file and field
    notes: list[str] = field(default_factory=list)  # how a file was interpreted, when that was a choice

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def skip(self, error: DataError) -> None:
        self.skipped += 1
        if len(self.skip_reasons) < MAX_REASONS:
            self.skip_reasons.append(str(error))


def read_records(
    sources: list | str,
    mapping: dict[str, str] | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
) -> ReadResult:
    """All records of all sources, in order; `limit` stops after the first N records overall."""
    result = ReadResult()
    for source in expand_sources([sources] if isinstance(sources, (str, dict)) else sources):
        if not _read_source(source, mapping, skip_bad, limit, result):
            break
    if limit is not None and len(result.records) > limit:
        del result.records[limit:]
    return result


def _read_source(source: Source, mapping, skip_bad: bool, limit: int | None, result: ReadResult) -> bool:
    """Append the records of one source; False once `limit` records are read."""
    name = display_name(source)
    layout, used = None, ()
    unused: Counter = Counter()
    rows = 0
    more = True
    for where, row in iter_rows(source, result.notes):
        if limit is not None and len(result.records) >= limit:
            more = False
            break
        if layout is None and isinstance(row, dict):
            # Detected once, from the first readable row; an unknown layout is an error even with skip_bad.
            layout = detect_layout(row, where, mapping)
            used = fields_used(layout, mapping)
            result.layouts[name] = layout
        try:
            if isinstance(row, DataError):  # a line the reader could not parse
                raise row
            result.records += to_records(row, layout, mapping, name, where)
            rows += 1
            unused.update(unused_text_fields(row, used))
        except DataError as e:
            if not skip_bad:
                raise
            result.skip(e)
    result.warnings += [unused_field_warning(name, f, n, rows, layout, mapping) for f, n in unused.items()]
    return more


def iter_rows(source: Source, notes: list[str] | None = None) -> Iterator[tuple[str, object]]:
    """(where, row) pairs; a row the reader could not parse is a DataError in place of the row."""
    if isinstance(source, HubSource):
        yield from hub_rows(source)
        return
    if isinstance(source, DiskSource):
        yield from disk_rows(source)
        return
    suffix = Path(source).suffix.lower()
    if suffix not in READERS:
        raise DataError(f"{source}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    if suffix == ".json":
        yield from json_rows(source, notes if notes is not None else [])
    else:
        yield from READERS[suffix](source)


def read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None


def decode_utf8(data: bytes, path: str, line_offset: int = 0) -> str:
    """Strict UTF-8, naming the line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_offset + data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col}); re-save the file as UTF-8"
        ) from None


def parse_json(text: str, path: str, first_line: int = 1):
    """json.loads, with a structure nested too deeply for Python's parser (a RecursionError, not a
    JSONDecodeError) reported as one line at the place it happens."""
    try:
        return json.loads(text)
    except RecursionError:
        line, depth = deepest_point(text)
        raise DataError(
            f"{path}:{first_line + line - 1}: JSON nested deeper than Python's parser allows "
            f"({depth} levels of [ and {{); a record is an object of fields"
        ) from None


def deepest_point(text: str) -> tuple[int, int]:
    """(line, depth) where the nesting of brackets outside strings first reaches its maximum."""
    depth = best = 0
    line = best_line = 1
    in_string = escaped = False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > best:
                best, best_line = depth, line
        elif ch in "]}":
            depth -= 1
    return best_line, best


def jsonl_rows(path: str) -> Iterator[tuple[str, object]]:
    data = read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for n, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{n}"
        if not raw.strip():
            continue
        try:
            row = parse_json(decode_utf8(raw, path, n - 1), path, n)
        except json.JSONDecodeError as e:
            row = DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
        except DataError as e:
            row = e
        yield where, row


def json_rows(path: str, notes: list[str]) -> Iterator[tuple[str, object]]:
    """A JSON array of records; an object holding a table of columns or one list of records is read
    too (and said so in `notes`); a .json file that is really JSON Lines is read as such."""
    data = read_bytes(path)
    text = decode_utf8(data[3:] if data.startswith(b"\xef\xbb\xbf") else data, path)
    try:
        doc = parse_json(text, path)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line, under a .json name
            yield from jsonl_rows(path)
            return
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(doc, dict):
        yield from object_rows(doc, path, notes)
        return
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a list of records, got {type(doc).__name__}")
    for i, row in enumerate(doc, 1):
        yield f"{path}:record {i}", row


def object_rows(doc: dict, path: str, notes: list[str]) -> Iterator[tuple[str, object]]:
    """Rows of a JSON object: a table of equal-length columns, or the one field that holds a list of
    records (SQuAD's {"data": [articles]} is flattened to one row per question)."""
    lists = {k: v for k, v in doc.items() if isinstance(v, list)}
    is_records = lambda v: bool(v) and all(isinstance(x, dict) for x in v)
    if doc and len(lists) == len(doc) and not all(is_records(v) for v in lists.values()):
        lengths = {k: len(v) for k, v in lists.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k} {n}" for k, n in lengths.items())
            raise DataError(f"{path}: columns of different lengths: {shown}; a table needs one value per row in each")
        n_rows = next(iter(lengths.values()))
        notes.append(f"{path}: read as a table of columns ({', '.join(lists)}), {n_rows} rows")
        for i in range(n_rows):
            yield f"{path}:row {i + 1}", {k: v[i] for k, v in lists.items()}
        return
    record_fields = [k for k, v in lists.items() if is_records(v)]
    if len(record_fields) == 1:
        key = record_fields[0]
        records = doc[key]
        if all(isinstance(r.get("paragraphs"), list) for r in records):
            rows = list(squad_articles(records))
            notes.append(f"{path}: read as SQuAD articles from field {key!r} ({len(rows)} questions)")
            yield from ((f"{path}:{where}", row) for where, row in rows)
            return
        notes.append(f"{path}: records read from field {key!r} ({len(records)} records)")
        for i, row in enumerate(records, 1):
            yield f"{path}:{key}[{i - 1}]", row
        return
    fields = ", ".join(sorted(doc)[:8]) + (", …" if len(doc) > 8 else "")
    raise DataError(
        f"{path}: the top level is an object with fields [{fields}], not a list of records; expected "
        "[{...}, ...], a table of equal-length columns, or one field holding the list of records"
    )


def squad_articles(articles: list[dict]) -> Iterator[tuple[str, dict]]:
    """The official SQuAD JSON ({"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]})
    as one row per question: id, title, context, question, answers."""
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(article["paragraphs"]):
            for q, qa in enumerate(paragraph.get("qas") or []):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                row = {
                    "title": article.get("title"),
                    "context": paragraph.get("context"),
                    **(qa if isinstance(qa, dict) else {}),
                }
                yield where, row


def csv_rows(path: str) -> Iterator[tuple[str, object]]:
    data = read_bytes(path)
    text = decode_utf8(data[3:] if data.startswith(b"\xef\xbb\xbf") else data, path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        twice = next((h for i, h in enumerate(header) if h in header[:i]), None)
        if twice is not None:
            raise DataError(f"{path}:1: the header names field {twice!r} twice")
        start = reader.line_num + 1  # line_num counts physical lines, so multi-line cells stay right
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                fields = f"{len(row)} field{'s' if len(row) != 1 else ''}"
                yield where, DataError(f"{where}: row has {fields}, the header has {len(header)} ({', '.join(header)})")
                continue
            yield where, dict(zip(header, row))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV ({e})") from None


def parquet_rows(path: str) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) for non-Parquet bytes
        raise DataError(f"{path}: cannot read as Parquet ({e})") from None
    offset = 0
    for batch in table.to_batches():
        for i, row in enumerate(batch.to_pylist()):
            yield f"{path}:row {offset + i + 1}", row
        offset += batch.num_rows


READERS = {".jsonl": jsonl_rows, ".json": json_rows, ".csv": csv_rows, ".parquet": parquet_rows}
