"""`qatune export MODEL OUT`: write a transformers-loadable GPT-2 folder (safetensors + tokenizer)."""

from __future__ import annotations

import argparse

from qatune.cli.common import add_tokenizer_option
from qatune.model.checkpoint import export_hf, from_pretrained
from qatune.runs import load_tokenizer_for, resolve_model_path


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face GPT2LMHeadModel folder", description=__doc__)
    p.add_argument("model", help="checkpoint folder, run folder or hub name")
    p.add_argument("out", help="output folder (replaced atomically)")
    add_tokenizer_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = from_pretrained(resolve_model_path(args.model))
    tokenizer = load_tokenizer_for(args.model, args.tokenizer)
    out = export_hf(model, args.out, tokenizer)
    print(f"wrote {out} ({model.num_parameters():,} parameters)")
    return 0
