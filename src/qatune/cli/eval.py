"""`qatune eval MODEL_OR_RUN DATA... [--compare BASE_MODEL]`: held-out response loss and perplexity,
and generation metrics (exact match, token F1, ROUGE-L, answer length, EOS rate), overall and per
source, written as report.json + report.md + generations.jsonl (resumable).
On a reward model and preference pairs: pair accuracy and score statistics (report.json + .md)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from qatune.cli.common import add_device_option, add_mapping_option, add_tokenizer_option, parse_mapping
from qatune.cli.generate import add_sampling_options, sampling_from_args
from qatune.errors import UserError
from qatune.utils.files import write_text_atomic

GENERATIONS = "generations.jsonl"
BASE_GENERATIONS = "base.generations.jsonl"


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss and generation metrics, optionally against a base model")
    p.description = __doc__
    p.add_argument("model", help="a run folder (its export/ is used), a checkpoint folder or a hub name")
    p.add_argument("data", nargs="+", help="held-out data: files, folders, globs or hf:dataset[:split]")
    p.add_argument("--compare", metavar="BASE_MODEL", help="also evaluate this model on the same prompts")
    p.add_argument("--out", help="report folder (default: RUN/eval for a run, else eval-<model name>)")
    p.add_argument("--template", help="template name; default: the one saved with the model, else 'plain'")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-len", type=int, help="default: the model's training max_len, else its context")
    p.add_argument("--truncation", help="default: the model's training policy, else cut_response")
    add_mapping_option(p)
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--examples", type=int, default=5, help="example generations shown in the report")
    add_sampling_options(p)
    add_tokenizer_option(p)
    add_device_option(p)
    p.set_defaults(func=run, max_new_tokens=None)  # None: 128, or half the smallest model's context


def default_out(model: str) -> Path:
    from qatune.runs import resolve_model_path

    if resolve_model_path(model) != model:  # a run folder
        return Path(model) / "eval"
    return Path(f"eval-{Path(model.rstrip('/')).name or 'model'}")


def training_truncation(model_path: str) -> str | None:
    """The truncation policy of the run that wrote this export (its resolved config.yaml), if any."""
    import yaml

    from qatune.runs import EXPORT_DIR

    config = Path(model_path).parent / "config.yaml"
    if Path(model_path).name != EXPORT_DIR or not config.exists():
        return None
    data = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("data") or {}
    return data.get("truncation")


def data_config(args: argparse.Namespace, meta: dict | None, context: int, model_path: str = ""):
    from qatune.data.pipeline import DataConfig

    meta = meta or {}
    max_len = args.max_len or meta.get("max_len") or context
    if max_len > context:
        raise UserError(f"max_len {max_len} exceeds the model's context of {context} tokens")
    return DataConfig(
        sources=list(args.data),
        mapping=parse_mapping(args.mapping),
        template=args.template or meta.get("template") or "plain",
        system_prompt=args.system_prompt,
        max_len=max_len,
        truncation=args.truncation or meta.get("truncation") or training_truncation(model_path) or "cut_response",
        limit=args.limit,
    )


def finite(obj):
    """JSON has no NaN: an undefined number (no label tokens) is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def progress_callback(label: str):
    """Generation progress on stderr: a rich bar on a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from rich.progress import Progress

    bar = Progress(transient=True)
    task = bar.add_task(f"generating ({label})", total=None)
    bar.start()
    return (lambda done, total: bar.update(task, completed=done, total=total)), bar.stop


def evaluate_one(model_name, tokenizer, data, out_file, settings, device) -> dict:
    from qatune.generation.evaluate import evaluate_model
    from qatune.runs import load_model

    model = load_model(model_name, device)
    advance, stop = progress_callback(model_name)
    try:
        return evaluate_model(model, tokenizer, data, out_file, settings, model_name, advance)
    finally:
        stop()


def run(args: argparse.Namespace) -> int:
    from qatune.generation.evaluate import EvalSettings
    from qatune.generation.report import render_markdown, summary_table
    from qatune.runs import load_tokenizer_for, read_meta, resolve_model_path
    from qatune.utils.device import default_device

    device = default_device(args.device)
    model_path = resolve_model_path(args.model)
    meta = read_meta(model_path)
    tokenizer = load_tokenizer_for(args.model, args.tokenizer)
    out = Path(args.out) if args.out else default_out(args.model)
    context = _context_of(model_path)
    fit_to_contexts(args, context)
    settings = EvalSettings(sampling_from_args(args), args.batch_size, args.examples)
    data = data_config(args, meta, context, model_path)
    from qatune.model.reward import is_reward_model

    if is_reward_model(model_path):
        return run_reward(args, model_path, data, tokenizer, out, device)
    report = evaluate_one(args.model, tokenizer, data, out / GENERATIONS, settings, device)
    base = None
    if args.compare:
        base = evaluate_one(args.compare, tokenizer, data, out / BASE_GENERATIONS, settings, device)
        report["base"] = base
    write_text_atomic(out / "report.json", json.dumps(finite(report), indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / "report.md", render_markdown(report, base))
    print("\n".join(summary_table(report, base)))
    for w in report["warnings"] + ([f"base: {w}" for w in base["warnings"]] if base else []):
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and {out / GENERATIONS}")
    return 0


def run_reward(args, model_path: str, data, tokenizer, out: Path, device) -> int:
    """A reward model on preference pairs: accuracy and score statistics."""
    from qatune.data.preference.encode import encode_pairs
    from qatune.data.preference.pipeline import read_distinct
    from qatune.generation.reward_scores import pair_report, report_lines, score_pairs
    from qatune.model.reward import load_reward_model

    if args.compare:
        raise UserError("--compare applies to language models; evaluate each reward model on the same pairs")
    read, distinct, identical = read_distinct(data)
    template = data.get_template()
    pairs = encode_pairs(distinct, template, tokenizer)
    rm = load_reward_model(model_path).to(device).eval()
    chosen, rejected = score_pairs(rm, pairs, tokenizer.eos_token_id, data.max_len, args.batch_size)
    report = {
        "model": args.model,
        "data": list(args.data),
        "template": template.to_dict(),
        "max_len": data.max_len,
        "records": len(read.pairs),
        "skipped": read.skipped,
        "identical_dropped": len(identical),
        **pair_report(chosen, rejected),
    }
    lines = report_lines(report)
    write_text_atomic(out / "report.json", json.dumps(finite(report), indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / "report.md", "\n".join([f"# Reward model {args.model}", "", *lines, ""]))
    print("\n".join(lines))
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return 0


def fit_to_contexts(args: argparse.Namespace, context: int) -> None:
    """The default max_new_tokens, as `generate` picks it, for the smaller context of the model and
    the --compare model: both answer the same prompts with the same settings."""
    from qatune.cli.generate import fit_max_new_tokens
    from qatune.runs import resolve_model_path

    if args.compare:
        context = min(context, _context_of(resolve_model_path(args.compare)))
    fit_max_new_tokens(args, context)


def _context_of(model_path: str) -> int:
    """The positions the model runs, from its config.json (GPT-2's n_positions, a Llama-family
    max_position_embeddings or sliding window); 1024 for a hub name not yet downloaded."""
    from qatune.model.families import context_length, read_config

    if (Path(model_path) / "config.json").exists():
        return context_length(read_config(model_path))
    return 1024
