"""`qatune generate MODEL_OR_RUN --prompt TEXT | --file DATA...`: answer prompts with a KV cache,
through the template the model was trained with. With `--out FILE.jsonl`, one record per prompt
(prompt, reference when the data has one, generation, metrics), written resumably."""

from __future__ import annotations

import argparse
import json
import sys

from qatune.cli.common import add_device_option, add_mapping_option, add_tokenizer_option, parse_mapping
from qatune.errors import UserError
from qatune.generation.settings import SamplingConfig


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    d = SamplingConfig()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    p.add_argument("--top-p", type=float, default=d.top_p, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false")


def fit_max_new_tokens(args: argparse.Namespace, context: int, cap: int = SamplingConfig.max_new_tokens) -> None:
    """--max-new-tokens left unset (None): `cap`, or half the context when that is smaller, so the
    prompt keeps the other half (the demo's 64-token model answers in up to 32 tokens)."""
    if args.max_new_tokens is None:
        args.max_new_tokens = min(cap, context // 2)


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_eos=args.stop_at_eos,
    )


def model_template(args: argparse.Namespace, meta: dict, tokenizer, default: str):
    """--template, else the template saved with the model (qatune.json), else `default`, bound to
    the tokenizer: `--template model` takes the tokenizer's chat template, one read back from
    qatune.json keeps the Jinja text it was trained with."""
    from qatune.data.templates import bind_template, get_template

    return bind_template(get_template(args.template or meta.get("template") or default, args.system_prompt), tokenizer)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate answers for prompts", description=__doc__)
    p.add_argument("model", help="a run folder (its export/ is used), a checkpoint folder or a hub name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument(
        "--file",
        nargs="+",
        help="data files/folders/globs/hf:datasets in any supported layout, or JSONL with only a 'prompt' field",
    )
    p.add_argument(
        "--template", help="template name (raw = the prompt as is); default: the model's own template, else raw"
    )
    p.add_argument("--system-prompt", default=None)
    add_mapping_option(p)
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="write JSONL records here (resumable) instead of printing")
    add_sampling_options(p)
    add_tokenizer_option(p)
    add_device_option(p)
    p.set_defaults(func=run, max_new_tokens=None)  # None: 128, or half a smaller model's context


def read_prompts(path: str) -> list[str]:
    """Prompts of a JSONL file whose records have only a 'prompt' field."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            prompt = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise UserError(f"{path}:{n}: field 'prompt' is missing, empty or not a string")
            prompts.append(prompt)
    return prompts


def prompt_items(args: argparse.Namespace, template) -> list:
    """What to answer: --prompt texts, or the records of the data files (with their references)."""
    from qatune.data.readers import read_records
    from qatune.data.records import DataError
    from qatune.generation.evaluate import prompt_item

    if args.prompt:
        return [prompt_only(f"--prompt {i + 1}", "--prompt", p, template) for i, p in enumerate(args.prompt)]
    try:
        records = read_records(args.file, parse_mapping(args.mapping), limit=args.limit).records
    except DataError:
        # Prompt-only JSONL (no answers): not a training layout, but fine to generate for.
        if args.mapping or not all(f.endswith(".jsonl") for f in args.file):
            raise
        texts = [(f, n, p) for f in args.file for n, p in enumerate(read_prompts(f), 1)]
        texts = texts[: args.limit] if args.limit is not None else texts
        return [prompt_only(f"{f}:{n}", f, p, template) for f, n, p in texts]
    return [prompt_item(r, template) for r in records]


def prompt_only(where: str, source: str, prompt: str, template):
    """A prompt with no reference answer, through the template (the model's chat template renders
    it whole, as apply_chat_template does)."""
    from qatune.data.model_template import ModelTemplate
    from qatune.generation.batch import PromptItem

    whole = isinstance(template, ModelTemplate)
    return PromptItem(where, source, prompt, template.render_prompt(prompt), whole=whole)


def run(args: argparse.Namespace) -> int:
    from qatune.data.encode import stop_ids
    from qatune.model.families import context_length
    from qatune.runs import load_model, load_tokenizer_for, read_meta, resolve_model_path
    from qatune.utils.device import default_device

    meta = read_meta(resolve_model_path(args.model)) or {}
    tokenizer = load_tokenizer_for(args.model, args.tokenizer)
    template = model_template(args, meta, tokenizer, "raw")
    items = prompt_items(args, template)
    stops = stop_ids(template, tokenizer)  # EOS, and the chat template's end of turn (`<|im_end|>`)
    model = load_model(args.model, default_device(args.device))
    fit_max_new_tokens(args, context_length(model.config))
    sampling = sampling_from_args(args)
    if args.out:
        return write_records(args, model, tokenizer, items, template, sampling, stops)
    from qatune.generation.batch import prompt_budget, prompt_ids
    from qatune.generation.sampling import generate_ids

    budget = prompt_budget(context_length(model.config), sampling.max_new_tokens)
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        ids = [prompt_ids(tokenizer, item, budget)[0] for item in chunk]
        for item, g in zip(chunk, generate_ids(model, ids, stops, sampling)):
            end = "" if g.stopped_at_eos else f"\n[no EOS within {sampling.max_new_tokens} tokens]"
            sys.stdout.write(f"{item.text}{tokenizer.decode(g.ids)}{end}\n")
            if len(items) > 1:
                sys.stdout.write("-" * 40 + "\n")
    return 0


def write_records(args, model, tokenizer, items, template, sampling, stops) -> int:
    from qatune.generation.batch import generate_to_file
    from qatune.generation.evaluate import warnings_for
    from qatune.generation.metrics import summarize

    settings = {"model": args.model, "template": template.to_dict()}
    records = generate_to_file(model, tokenizer, items, args.out, sampling, args.batch_size, settings, stops=stops)
    print(f"wrote {len(records)} records to {args.out}")
    scored = [r for r in records if r["reference"] is not None]
    if scored:
        s = summarize(scored)
        scores = f"exact match {s['exact_match']:.1%}, token F1 {s['f1']:.1%}, ROUGE-L {s['rouge_l']:.1%}"
        print(f"{scores} ({s['n']} records with a reference)")
    stopped = sum(r["stopped_at_eos"] for r in records)
    gen = {"n": len(records), "no_eos": len(records) - stopped, "prompts_cut": sum(r["prompt_cut"] for r in records)}
    for w in warnings_for(gen, sampling.max_new_tokens):
        print(f"warning: {w}", file=sys.stderr)
    return 0
