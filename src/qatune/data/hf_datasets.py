"""Rows from Hugging Face `datasets`: hub data sets (with config, split, data_files, streaming) and
folders written by `save_to_disk`.

A hub data set that needs the network is only asked for after one quick connection to the hub
succeeds: offline, the answer is one line within seconds (with how to point at a local copy),
not minutes of retries. With `HF_HUB_OFFLINE=1`, `datasets` reads its local cache.
"""

from __future__ import annotations

from collections.abc import Iterator

from qatune.data.records import DataError
from qatune.data.sources import DiskSource, HubSource
from qatune.utils.hub import hub_host, offline_mode, unreachable_reason

# `datasets` builders that read the given data_files, not a hub repository.
PACKAGED = ("json", "csv", "parquet", "text", "arrow")


def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def needs_network(src: HubSource) -> bool:
    return not (src.name in PACKAGED and src.data_files)


def hub_rows(src: HubSource) -> Iterator[tuple[str, object]]:
    import datasets

    if needs_network(src) and not offline_mode():
        reason = unreachable_reason()
        if reason:
            raise DataError(
                f"{src}: not a local file or folder, and the Hugging Face hub ({hub_host()[0]}) cannot be reached "
                f"({reason}); save the data set where there is network "
                "(`datasets.load_dataset(...).save_to_disk(DIR)`) and give DIR, "
                "or set HF_HUB_OFFLINE=1 to use the local cache"
            )
    kwargs = {"streaming": True} if src.streaming else {}
    if src.data_files:
        kwargs["data_files"] = src.data_files
    if src.revision:
        kwargs["revision"] = src.revision
    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split, **kwargs)
    except Exception as e:  # datasets raises many types (network, missing config or split, bad name)
        if offline_mode():
            raise DataError(
                f"{src}: not in the local cache (HF_HUB_OFFLINE is set), or not loadable from it ({one_line(e)})"
            ) from None
        what = f"config {src.config!r}, " if src.config else ""
        raise DataError(
            f"{src}: not a local file or folder, and cannot load it as Hugging Face dataset {src.name!r} "
            f"({what}split {src.split!r}): {one_line(e)}"
        ) from None
    prefix = f"{src.name}:{src.config}:{src.split}" if src.config else f"{src.name}:{src.split}"
    yield from _rows(ds, prefix, str(src))


def disk_rows(src: DiskSource) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        ds = datasets.load_from_disk(src.path)
    except Exception as e:
        raise DataError(f"{src.path}: cannot read this save_to_disk folder ({one_line(e)})") from None
    where = src.path
    if isinstance(ds, datasets.DatasetDict):
        split = src.split or "train"
        if split not in ds:
            raise DataError(
                f"{src.path}: no split {split!r}; splits: {', '.join(ds)} (choose one with {{path: ..., split: ...}})"
            )
        ds, where = ds[split], f"{src.path}:{split}"
    elif src.split is not None:
        raise DataError(f"{src.path}: a single saved Dataset has no splits (got split {src.split!r})")
    yield from _rows(ds, where, src.path)


def _rows(ds, prefix: str, name: str) -> Iterator[tuple[str, object]]:
    """Rows one at a time (a streamed set is never held whole); a failure while streaming is one line."""
    it = iter(ds)
    i = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{name}: reading row {i + 1} failed ({one_line(e)})") from None
        yield f"{prefix}[{i}]", row
        i += 1
