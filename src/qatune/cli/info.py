"""`qatune info MODEL`: shape and parameter count of a GPT-2, by component."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SIZE_NOTE = "note: GPT-2 Large has 774M parameters; the 1.5B model is GPT-2 XL (48 layers, d=1600, 25 heads)."


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="layers, widths and parameter counts of a GPT-2", description=__doc__)
    p.add_argument("model", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl, or a checkpoint folder / hub name")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def config_of(model: str):
    from qatune.model.gpt2 import SIZES
    from qatune.model.hf_io import config_from_hf, resolve_checkpoint_dir

    if model in SIZES:  # offline: the named sizes are data
        return SIZES[model]
    folder = resolve_checkpoint_dir(model)
    return config_from_hf(json.loads((Path(folder) / "config.json").read_text()))


def run(args: argparse.Namespace) -> int:
    from qatune.model.info import COMPONENTS, model_info

    info = model_info(config_of(args.model), args.model)
    if args.model in ("gpt2-large", "gpt2-xl"):
        info["note"] = SIZE_NOTE
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    counts = info["parameters"]
    rows = [
        ("layers", info["n_layer"]),
        ("d_model", info["d_model"]),
        ("heads", f"{info['n_head']} x {info['head_dim']}"),
        ("d_ff", info["d_ff"]),
        ("context", info["context"]),
        ("vocab", info["vocab_size"]),
    ]
    print(f"{args.model}")
    for k, v in rows:
        print(f"  {k:<12}{v:>16}")
    print("  parameters")
    for c in COMPONENTS:
        print(f"    {c:<10}{counts[c]:>16,}  {100 * counts[c] / counts['total']:5.1f}%")
    print(f"    {'total':<10}{counts['total']:>16,}  ({counts['total'] / 1e6:.1f}M)")
    if "note" in info:
        print(info["note"])
    return 0
