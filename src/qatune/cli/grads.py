"""`qatune grads MODEL_OR_RUN DATA…`: measure the gradient dynamics of instruction tuning.

On a sample of the data, with the model's own template: per-example gradient norms against
response and total length with power-law fits (loss summed and averaged over tokens), the
instruction's and the response's share of the gradient when the instruction is not masked, the
gradient noise scale and the batch size it suggests, and per-layer gradient norms and
update-to-weight ratios for one AdamW step.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from qatune.cli.common import add_device_option, add_tokenizer_option
from qatune.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "grads", help="gradient dynamics: norms vs length, segment shares, noise scale", description=__doc__
    )
    p.add_argument("model", help="run folder, checkpoint folder or hub name")
    p.add_argument("data", nargs="+", help="data files, globs or dataset names")
    p.add_argument("--n", type=int, default=64, help="examples sampled for per-example gradients (default 64)")
    p.add_argument("--segments-n", type=int, default=16, help="examples for the instruction/response split")
    p.add_argument("--bins", type=int, default=4, help="length bins for the variance fit (0 = skip; saves memory)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of the one AdamW step (default 5e-5)")
    p.add_argument("--template", default=None, help="prompt template (default: the model's own, else plain)")
    p.add_argument("--max-len", type=int, default=None, help="default: the model's training max_len, else 1024")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for grads.json and the plots")
    add_tokenizer_option(p)
    add_device_option(p)
    p.set_defaults(func=run)


def sample_examples(args: argparse.Namespace, tokenizer, meta: dict | None):
    from qatune.data.pipeline import DataConfig, load_examples

    meta = meta or {}
    cfg = DataConfig(
        sources=args.data,
        template=args.template or meta.get("template") or "plain",
        max_len=args.max_len or meta.get("max_len") or 1024,
    )
    examples = [e for e in load_examples(cfg, tokenizer).examples if e.n_label_tokens > 0]
    random.Random(args.seed).shuffle(examples)
    return examples


def run(args: argparse.Namespace) -> int:
    import torch

    from qatune.analysis.grads import per_example_analysis, per_layer_step, segment_shares
    from qatune.analysis.grads_report import summary_lines, write_outputs
    from qatune.model.families import from_pretrained
    from qatune.runs import load_tokenizer_for, read_meta, resolve_model_path
    from qatune.utils.device import default_device

    torch.manual_seed(args.seed)
    model_path = resolve_model_path(args.model)
    model = from_pretrained(model_path).to(default_device(args.device))  # either family, by model_type
    tokenizer = load_tokenizer_for(model_path, args.tokenizer)
    examples = sample_examples(args, tokenizer, read_meta(model_path))
    if len(examples) < 8:
        raise UserError(f"only {len(examples)} examples with a response in {', '.join(args.data)}; need at least 8")
    sample = examples[: args.n]
    result = {
        "model": args.model,
        "lr": args.lr,
        "per_example": per_example_analysis(model, sample, n_bins=args.bins, progress=_progress(sample)),
        "segments": segment_shares(model, examples[: args.segments_n]),
        "layers": per_layer_step(model, examples[: args.segments_n], lr=args.lr),
    }
    print("\n".join(summary_lines(result)))
    if args.out:
        for path in write_outputs(result, Path(args.out)):
            print(f"wrote {path}")
    return 0


def _progress(items):
    from rich.progress import track

    return track(items, description="per-example gradients", transient=True)
