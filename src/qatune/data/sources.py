"""Data sources as users name them: files, folders, globs, `Dataset.save_to_disk` folders, and
Hugging Face hub data sets, as a string or as a mapping.

    "train.jsonl", "data/", "data/*.csv"            local files (a folder: its data files, sorted)
    "saved/"                                         a folder written by Dataset(Dict).save_to_disk
    "tatsu-lab/alpaca", "org/set:test"               hub data set [: split]
    "openai/gsm8k:main", "openai/gsm8k:main:test"    hub data set : config (subset) [: split]
    {hub: openai/gsm8k, config: main, split: test, data_files: ..., streaming: true, revision: ...}
    {path: saved/, split: test}

In `NAME:X`, X is a split when it looks like one (train, test, validation, dev, ... with an
optional slice such as `train[:1000]`), otherwise a config. A string that looks like a local path
(./x, /x, a/b/c, ...) and does not exist is an error here: it is never sent to the hub.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from qatune.data.records import DataError
from qatune.utils.hub import looks_like_local_path

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HF_PREFIX = "hf:"
SPLIT_LIKE = re.compile(r"(train|test|validation|valid|val|dev|eval|all)\b")
SOURCE_KEYS = ("hub", "path", "config", "split", "data_files", "streaming", "revision")


@dataclass(frozen=True)
class HubSource:
    """A data set loaded through `datasets.load_dataset(name, config, split=..., ...)`."""

    name: str
    config: str | None = None
    split: str = "train"
    data_files: str | list | dict | None = None
    streaming: bool = False  # rows read as they arrive: the set is never downloaded whole
    revision: str | None = None
    label: str = ""  # how reports name it

    def __str__(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class DiskSource:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""

    path: str
    split: str | None = None  # for a DatasetDict; default "train"

    def __str__(self) -> str:
        return self.path if self.split is None else f"{self.path}:{self.split}"


Source = str | HubSource | DiskSource  # a str is a local file


def display_name(source: Source) -> str:
    return str(source)


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def parse_hub_spec(spec: str) -> HubSource:
    """`name`, `name:split`, `name:config` or `name:config:split` (see the module doc)."""
    name, _, rest = spec.partition(":")
    if not name or (_ and not rest):
        raise DataError(f"{spec}: expected NAME, NAME:SPLIT, NAME:CONFIG or NAME:CONFIG:SPLIT")
    if not rest:
        return HubSource(name, label=spec)
    if SPLIT_LIKE.match(rest):  # the split may hold a slice with colons: train[:1000]
        return HubSource(name, split=rest, label=spec)
    config, _, split = rest.partition(":")
    if _ and not split:
        raise DataError(f"{spec}: expected NAME, NAME:SPLIT, NAME:CONFIG or NAME:CONFIG:SPLIT")
    return HubSource(name, config, split or "train", label=spec)


def source_from_mapping(d: dict) -> HubSource | DiskSource | str:
    unknown = [k for k in d if k not in SOURCE_KEYS]
    if unknown:
        raise DataError(f"data source: unknown key {unknown[0]!r}; known keys: {', '.join(SOURCE_KEYS)}")
    if ("hub" in d) == ("path" in d):
        raise DataError(f"data source {d}: give exactly one of 'hub' (a data set name) or 'path' (a folder)")
    if "path" in d:
        path = Path(str(d["path"]))
        if is_saved_dataset(path):
            return DiskSource(str(path), d.get("split"))
        extra = sorted(set(d) - {"path"})
        if extra:
            raise DataError(f"data source {d}: {extra[0]!r} applies to hub data sets and save_to_disk folders only")
        return str(path)
    name, config, split = str(d["hub"]), d.get("config"), d.get("split") or "train"
    files = d.get("data_files")
    label = ":".join(str(p) for p in (name, config, split) if p)
    if files:
        shown = files if isinstance(files, str) else next(iter(files), "")
        label += f" ({shown}{' …' if not isinstance(files, str) and len(files) > 1 else ''})"
    return HubSource(name, config, split, files, bool(d.get("streaming", False)), d.get("revision"), label=label)


def expand_sources(sources: list) -> list[Source]:
    """Files stay files, folders become their data files (or one saved data set), globs are
    expanded (sorted), mappings and anything else that is not a path are hub data sets."""
    if not sources:
        raise DataError("no data sources given")
    out: list[Source] = []
    for s in sources:
        if isinstance(s, dict):
            source = source_from_mapping(s)
            out += expand_sources([source]) if isinstance(source, str) else [source]
            continue
        if isinstance(s, (HubSource, DiskSource)):
            out.append(s)
            continue
        s = str(s)
        path = Path(s)
        if s.startswith(HF_PREFIX):
            out.append(parse_hub_spec(s[len(HF_PREFIX) :]))
        elif path.is_dir() and is_saved_dataset(path):
            out.append(DiskSource(s))
        elif path.is_dir():
            files = sorted(str(p) for p in path.iterdir() if p.suffix in FILE_SUFFIXES and p.is_file())
            if not files:
                raise DataError(f"{s}: folder has no {'/'.join(FILE_SUFFIXES)} files")
            out += files
        elif path.exists():
            out.append(s)
        elif glob.has_magic(s.split(":", 1)[0]):  # not the slice of a split: name:train[:100]
            files = sorted(p for p in glob.glob(s, recursive=True) if Path(p).is_file())
            if not files:
                raise DataError(f"{s}: no file matches this pattern")
            out += files
        elif looks_like_path(s):
            raise DataError(f"{s}: no such file or folder")
        else:
            out.append(parse_hub_spec(s))
    return out


def looks_like_path(s: str) -> bool:
    return looks_like_local_path(s.split(":", 1)[0]) or s.lower().endswith(FILE_SUFFIXES)
