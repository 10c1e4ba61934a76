"""`qatune export MODEL OUT [--adapter DIR]`: write a transformers folder of the model's own
architecture (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM …: safetensors + tokenizer).

MODEL is a run folder (its final export), an exported folder, a checkpoint of a run
(`runs/x/checkpoints/step_00000400`, single-process or sharded) or a hub name. `--adapter` merges
a LoRA adapter in peft's format (a run's `adapter/`, or one peft saved for the same base) into
MODEL: W + (alpha/r) B A, written as a plain model. The tokenizer
config gets the run's template as a Jinja `chat_template` and its context as `model_max_length`;
`qatune.json` (template, max_len, steps …) and the model card (README.md) are kept; a checkpoint
gets a card made from its run (its config, metrics.jsonl up to its step)."""

from __future__ import annotations

import argparse

from qatune.cli.common import add_tokenizer_option


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face transformers folder", description=__doc__)
    p.add_argument("model", help="run folder, checkpoint folder (checkpoints/step_*), exported folder or hub name")
    p.add_argument("out", help="output folder (replaced atomically)")
    p.add_argument("--adapter", help="a LoRA adapter folder (peft's format) to merge into MODEL")
    add_tokenizer_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qatune.export import export_saved

    out, n_params = export_saved(args.model, args.out, args.tokenizer, args.adapter)
    print(f"wrote {out} ({n_params:,} parameters)")
    return 0
