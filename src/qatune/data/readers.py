"""Reading records from JSON, JSONL, CSV and Parquet files (one, several, a folder or a glob) and
from Hugging Face datasets, with the layout detected per source.

    result = read_records(["data/*.jsonl", "hf:tatsu-lab/alpaca:train"], mapping=None, skip_bad=False)
    for record in result: ...          # Record(source, where, prompt, response, context, messages)
    result.layouts                     # {"data/a.jsonl": "prompt_completion", ...}
    result.skipped, result.skip_reasons

Every error names the file, the line or record, and the field. With `skip_bad`, bad rows are
counted and the first few reasons kept instead; a file that cannot be opened or decoded as a whole
(or has an unknown layout) is an error either way.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qatune.data.layouts import detect_layout, to_records
from qatune.data.records import DataError, Record

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HF_PREFIX = "hf:"
MAX_REASONS = 5  # skip reasons kept for the report


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    layouts: dict[str, str] = field(default_factory=dict)  # source -> detected layout
    skipped: int = 0  # bad rows left out (skip_bad)
    skip_reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS of them

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def skip(self, error: DataError) -> None:
        self.skipped += 1
        if len(self.skip_reasons) < MAX_REASONS:
            self.skip_reasons.append(str(error))


def read_records(
    sources: list[str] | str,
    mapping: dict[str, str] | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
) -> ReadResult:
    """All records of all sources, in order; `limit` stops after the first N records overall."""
    result = ReadResult()
    for source in expand_sources([sources] if isinstance(sources, str) else sources):
        layout = None
        for where, row in iter_rows(source):
            if limit is not None and len(result.records) >= limit:
                return result
            if layout is None and isinstance(row, dict):
                # Detected once, from the first readable row; an unknown layout is an error even with skip_bad.
                layout = detect_layout(row, where, mapping)
                result.layouts[display_name(source)] = layout
            try:
                if isinstance(row, DataError):  # a line the reader could not parse
                    raise row
                result.records += to_records(row, layout, mapping, display_name(source), where)
            except DataError as e:
                if not skip_bad:
                    raise
                result.skip(e)
        if limit is not None and len(result.records) > limit:
            del result.records[limit:]
    return result


def display_name(source: str) -> str:
    return source[len(HF_PREFIX) :] if source.startswith(HF_PREFIX) else source


def expand_sources(sources: list[str]) -> list[str]:
    """Files stay files, folders become their data files, globs are expanded (sorted), anything else
    that is not a path is a Hugging Face dataset name (returned with the "hf:" prefix)."""
    if not sources:
        raise DataError("no data sources given")
    out: list[str] = []
    for s in sources:
        s = str(s)
        path = Path(s)
        if s.startswith(HF_PREFIX):
            out.append(s)
        elif path.is_dir():
            files = sorted(str(p) for p in path.iterdir() if p.suffix in FILE_SUFFIXES and p.is_file())
            if not files:
                raise DataError(f"{s}: folder has no {'/'.join(FILE_SUFFIXES)} files")
            out += files
        elif path.exists():
            out.append(s)
        elif glob.has_magic(s):
            files = sorted(p for p in glob.glob(s, recursive=True) if Path(p).is_file())
            if not files:
                raise DataError(f"{s}: no file matches this pattern")
            out += files
        elif looks_like_path(s):
            raise DataError(f"{s}: no such file or folder")
        else:
            out.append(HF_PREFIX + s)
    return out


def looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith(FILE_SUFFIXES)


def iter_rows(source: str) -> Iterator[tuple[str, object]]:
    if source.startswith(HF_PREFIX):
        yield from hf_rows(source[len(HF_PREFIX) :])
        return
    suffix = Path(source).suffix.lower()
    readers = {".jsonl": jsonl_rows, ".json": json_rows, ".csv": csv_rows, ".parquet": parquet_rows}
    if suffix not in readers:
        raise DataError(f"{source}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")
    yield from readers[suffix](source)


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


def jsonl_rows(path: str) -> Iterator[tuple[str, object]]:
    data = read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for n, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{n}"
        if not raw.strip():
            continue
        try:
            line = decode_utf8(raw, path, n - 1)
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
        except DataError as e:
            row = e
        yield where, row


def json_rows(path: str) -> Iterator[tuple[str, object]]:
    """A JSON array of objects (or {"data": [...]}); a .json file that is really JSON Lines is read as such."""
    data = read_bytes(path)
    text = decode_utf8(data[3:] if data.startswith(b"\xef\xbb\xbf") else data, path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line, under a .json name
            yield from jsonl_rows(path)
            return
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a list of records, got {type(doc).__name__}")
    for i, row in enumerate(doc, 1):
        yield f"{path}:record {i}", row


def csv_rows(path: str) -> Iterator[tuple[str, object]]:
    data = read_bytes(path)
    text = decode_utf8(data[3:] if data.startswith(b"\xef\xbb\xbf") else data, path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        start = 2  # the header is line 1; line_num counts physical lines, so multi-line cells stay right
        for row in reader:
            yield f"{path}:{start}", {k: v for k, v in row.items() if k is not None}
            start = reader.line_num + 1
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


def hf_rows(spec: str) -> Iterator[tuple[str, object]]:
    """`name` or `name:split` (default split: train), loaded through `datasets.load_dataset`."""
    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (network, missing split, bad name)
        raise DataError(
            f"{spec}: not a local file or folder, and cannot load it as Hugging Face dataset {name!r} "
            f"split {split!r} ({type(e).__name__}: {e})"
        ) from None
    for i, row in enumerate(ds):
        yield f"{name}:{split}[{i}]", row
