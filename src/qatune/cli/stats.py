"""`qatune stats DATA... --tokenizer T [--compare-tokenizer T2] --max-len N [--template NAME|FILE]
[--out DIR] [--json FILE]`: token-length statistics of questions and answers, truncation under every
policy, padding waste of each batching strategy; a table on the terminal, and a Markdown report,
JSON and PNG plots. `--compare-tokenizer` (repeatable) adds the same records measured with other
tokenizers side by side: characters per token per field, tokens per example, share over max_len.
On preference data (chosen/rejected pairs): prompt, chosen and rejected lengths, length bias, and
truncation under every pair policy."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from qatune.cli.common import add_mapping_option, add_tokenizer_option, parse_mapping
from qatune.data.truncation import POLICIES
from qatune.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="token lengths, truncation and padding of a data set", description=__doc__)
    p.add_argument("data", nargs="+", help="files, folders, globs, or Hugging Face dataset names (name[:split])")
    add_tokenizer_option(p)
    p.add_argument(
        "--compare-tokenizer",
        action="append",
        default=[],
        metavar="T",
        help="also measure with this tokenizer, side by side with --tokenizer (repeatable; e.g. qwen2.5)",
    )
    p.add_argument("--max-len", type=int, default=1024, help="context limit T_max (default 1024)")
    p.add_argument("--template", default="plain", help="plain | raw | alpaca | chat | hh, or a YAML/JSON file with one")
    p.add_argument("--system-prompt", default=None, help="system text for the chat template")
    add_mapping_option(p)
    p.add_argument("--train-on-turns", choices=["all", "last"], default="all")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of failing")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument(
        "--batch-size", type=int, default=8, help="micro-batch size for the padding study, as batch.size (default 8)"
    )
    p.add_argument(
        "--batch-unit", choices=["examples", "tokens"], default="examples", help="unit of --batch-size, as batch.unit"
    )
    p.add_argument("--out", help="folder for stats.md, stats.json, lengths_hist.png, lengths_cdf.png")
    p.add_argument("--json", help="write the JSON here ('-' for stdout)")
    p.set_defaults(func=run)


def template_arg(value: str):
    path = Path(value)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        import yaml

        return yaml.safe_load(path.read_text(encoding="utf-8"))
    return value


def source_groups(data: list[str], encodings) -> dict[str, list[int]]:
    """Example indices per DATA argument when several are given, else per file (named relative to
    the folder they share, so a folder of 96 files gives readable rows)."""
    from qatune.data.readers import display_name, expand_sources

    owner = {}
    if len(data) > 1:
        for arg in data:
            for s in expand_sources([arg]):
                owner.setdefault(display_name(s), arg)
    else:
        files = sorted({enc.source for enc in encodings})
        if len(files) > 1 and all(Path(f).is_file() for f in files):
            base = os.path.commonpath(files)
            owner = {f: os.path.relpath(f, base) for f in files}
    groups: dict[str, list[int]] = {}
    for i, enc in enumerate(encodings):
        groups.setdefault(owner.get(enc.source, enc.source), []).append(i)
    return groups


def is_preference(cfg) -> bool:
    from qatune.data.preference.records import sniff_preference

    if cfg.mapping:
        return "chosen" in cfg.mapping or "rejected" in cfg.mapping
    return sniff_preference(cfg.sources)


def write_outputs(args, stats: dict, meta: dict, make_tables, plot) -> None:
    """The tables on the terminal; stats.md/.json and plots under --out; JSON to --json."""
    from rich.console import Console

    from qatune.data.stats_render import markdown, print_tables
    from qatune.utils.files import write_text_atomic

    text = json.dumps({**meta, **stats}, indent=2, ensure_ascii=False) + "\n"
    out_console = Console()
    if not out_console.is_terminal:  # piped or redirected: wide enough for every column
        out_console = Console(width=140)
    print_tables(stats, out_console, make_tables)
    if meta["skipped"]:
        Console(stderr=True).print(f"skipped {meta['skipped']} bad records, e.g. {meta['skip_reasons'][0]}")
    for line in [f"warning: {w}" for w in meta.get("warnings", [])] + [f"note: {n}" for n in meta.get("notes", [])]:
        print(line, file=sys.stderr)
    if args.out:
        out = Path(args.out)
        write_text_atomic(out / "stats.json", text)
        write_text_atomic(out / "stats.md", markdown(stats, meta, make_tables))
        plot(out)
        print(f"wrote {out}/stats.md, stats.json, lengths_hist.png, lengths_cdf.png")
    if args.json == "-":
        sys.stdout.write(text)
    elif args.json:
        write_text_atomic(args.json, text)


def run_pairs(args, cfg, template, tokenizer) -> int:
    from qatune.data.preference.encode import encode_pairs
    from qatune.data.preference.pipeline import read_distinct
    from qatune.data.preference.stats import pair_stats, pair_tables, save_pair_plots
    from qatune.model.tokenizer import tokenizer_location

    if args.compare_tokenizer:
        raise UserError("--compare-tokenizer measures instruction data; preference pairs are not compared")
    read, distinct, identical = read_distinct(cfg)
    pairs = encode_pairs(distinct, template, tokenizer)
    stats = pair_stats(pairs, cfg.max_len, len(identical))
    meta = {
        "sources": list(args.data),
        "layouts": read.layouts,
        "template": template.to_dict(),
        "tokenizer": tokenizer_location(args.tokenizer),
        "records": len(read.pairs),
        "skipped": read.skipped,
        "skip_reasons": read.skip_reasons,
        "identical_where": identical[:5],
    }
    write_outputs(args, stats, meta, pair_tables, lambda out: save_pair_plots(pairs, cfg.max_len, out))
    return 0


def encode_with_bar(records, template, tokenizer, train_on_turns: str, label: str = "tokenizing"):
    """The records encoded as training encodes them, with a progress bar on a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qatune.data.encode import encode_records

    err = Console(stderr=True)
    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("tokenize", total=len(records))
        return encode_records(records, template, tokenizer, train_on_turns, progress=lambda n: bar.advance(task, n))


def side_by_side(args, records, template, encodings, tokenizer, cost, others: dict) -> list[dict]:
    """--tokenizer and each --compare-tokenizer on the same records: `stats_compare` summaries."""
    from qatune.data.stats_compare import tokenizer_summary, with_ratios
    from qatune.model.tokenizer import tokenizer_location

    location = tokenizer_location(args.tokenizer)
    summaries = [tokenizer_summary(location, records, encodings, tokenizer, args.max_len, cost)]
    for name, other in others.items():
        other_encodings = encode_with_bar(records, template, other, args.train_on_turns, f"tokenizing ({name})")
        summaries.append(tokenizer_summary(name, records, other_encodings, other, args.max_len))
    return with_ratios(summaries)


def run(args: argparse.Namespace) -> int:
    from qatune.data.pipeline import DataConfig
    from qatune.data.readers import read_records
    from qatune.data.stats import compute_stats, data_warnings, lengths_of
    from qatune.data.stats_render import save_plots, tables
    from qatune.data.token_cost import token_cost
    from qatune.model.tokenizer import load_tokenizer, tokenizer_location

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    cfg = DataConfig(
        sources=args.data,
        mapping=parse_mapping(args.mapping),
        template=template_arg(args.template),
        system_prompt=args.system_prompt,
        max_len=args.max_len,
        truncation=POLICIES[0],
        train_on_turns=args.train_on_turns,
        skip_bad=args.skip_bad,
        limit=args.limit,
    )
    template = cfg.get_template()  # a bad template fails before any reading
    tokenizer = load_tokenizer(args.tokenizer)
    if is_preference(cfg):
        return run_pairs(args, cfg, template, tokenizer)
    others = {name: load_tokenizer(name) for name in args.compare_tokenizer}  # a bad name fails before reading
    read = read_records(cfg.sources, cfg.mapping, cfg.skip_bad, cfg.limit)
    if not read.records:
        raise UserError(f"no records in {', '.join(map(str, cfg.sources))} ({read.skipped} bad records skipped)")
    encodings = encode_with_bar(read.records, template, tokenizer, cfg.train_on_turns)
    groups = source_groups(args.data, encodings)
    stats = compute_stats(encodings, cfg.max_len, args.batch_size, groups, args.batch_unit)
    stats["chars_per_token"] = token_cost(read.records, tokenizer)
    if others:
        stats["tokenizers"] = side_by_side(
            args, read.records, template, encodings, tokenizer, stats["chars_per_token"], others
        )
    meta = {
        "sources": list(args.data),
        "layouts": read.layouts,
        "template": template.to_dict(),
        "tokenizer": tokenizer_location(args.tokenizer),
        "records": len(read.records),
        "skipped": read.skipped,
        "skip_reasons": read.skip_reasons,
        "warnings": read.warnings + data_warnings(stats),
        "notes": read.notes,
    }
    write_outputs(args, stats, meta, tables, lambda out: save_plots(*lengths_of(encodings), cfg.max_len, out))
    return 0
