"""`qatune generate MODEL --prompt TEXT | --file prompts.jsonl`: sample completions with a KV cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qatune.cli.common import add_device_option, add_tokenizer_option, load_model, load_tokenizer_for, pick_device
from qatune.generation.sampling import SamplingConfig, generate_text


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    d = SamplingConfig()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    p.add_argument("--top-p", type=float, default=d.top_p, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false")


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_eos=args.stop_at_eos,
    )


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate completions for prompts", description=__doc__)
    p.add_argument("model", help="checkpoint folder or hub name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--file", help="JSONL file with a 'prompt' field per line")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="write JSONL {prompt, completion} here instead of printing")
    add_sampling_options(p)
    add_tokenizer_option(p)
    add_device_option(p)
    p.set_defaults(func=run)


def read_prompts(path: str) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            prompt = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{n}: field 'prompt' is missing, empty or not a string")
            prompts.append(prompt)
    return prompts


def run(args: argparse.Namespace) -> int:
    prompts = args.prompt or read_prompts(args.file)
    model = load_model(args.model, pick_device(args.device))
    tokenizer = load_tokenizer_for(args.model, args.tokenizer)
    completions = generate_text(model, tokenizer, prompts, sampling_from_args(args), args.batch_size)
    if args.out:
        from qatune.utils.files import atomic_write

        with atomic_write(Path(args.out)) as f:
            for p, c in zip(prompts, completions):
                f.write(json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) + "\n")
        print(f"wrote {len(prompts)} completions to {args.out}")
    else:
        for p, c in zip(prompts, completions):
            sys.stdout.write(f"{p}{c}\n" + ("-" * 40 + "\n" if len(prompts) > 1 else ""))
    return 0
