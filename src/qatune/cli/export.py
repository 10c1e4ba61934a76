"""`qatune export MODEL OUT`: write a transformers-loadable GPT-2 folder (safetensors + tokenizer).

MODEL is a run folder (its final export), an exported folder, a checkpoint of a run
(`runs/x/checkpoints/step_00000400`, single-process or sharded) or a hub name. The tokenizer
config gets the run's template as a Jinja `chat_template` and its context as `model_max_length`;
`qatune.json` (template, max_len, steps …) and the model card (README.md) are kept; a checkpoint
gets a card made from its run (its config, metrics.jsonl up to its step)."""

from __future__ import annotations

import argparse

from qatune.cli.common import add_tokenizer_option


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face GPT2LMHeadModel folder", description=__doc__)
    p.add_argument("model", help="run folder, checkpoint folder (checkpoints/step_*), exported folder or hub name")
    p.add_argument("out", help="output folder (replaced atomically)")
    add_tokenizer_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qatune.export import export_saved

    out, n_params = export_saved(args.model, args.out, args.tokenizer)
    print(f"wrote {out} ({n_params:,} parameters)")
    return 0
