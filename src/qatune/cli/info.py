"""`qatune info MODEL`: shape and parameter count of a GPT-2 or Llama-family model, by component."""

from __future__ import annotations

import argparse
import json

SIZE_NOTE = "note: GPT-2 Large has 774M parameters; the 1.5B model is GPT-2 XL (48 layers, d=1600, 25 heads)."


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="layers, widths and parameter counts of a model", description=__doc__)
    p.add_argument(
        "model", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | smollm2-135m, or a checkpoint folder / hub name"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def config_of(model: str):
    """A named size (offline: the sizes are data), or the config.json of a folder or hub model,
    read by its family (config.json's model_type)."""
    from qatune.model.hf_io import resolve_checkpoint_dir
    from qatune.model.info import SIZES, config_from_folder

    if model in SIZES:
        return SIZES[model]
    return config_from_folder(resolve_checkpoint_dir(model))


def run(args: argparse.Namespace) -> int:
    from qatune.model.info import model_info

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
        *([("kv heads", info["n_kv_head"])] if info["n_kv_head"] != info["n_head"] else []),
        ("d_ff", info["d_ff"]),
        ("context", info["context"]),
        ("vocab", info["vocab_size"]),
    ]
    tied = {True: ", tied head", False: ", untied head"}.get(info.get("tied_head"), "")
    print(f"{args.model} ({info['model_type']}{tied})")
    for k, v in rows:
        print(f"  {k:<12}{v:>16}")
    print("  parameters")
    for c in (c for c in counts if c != "total"):
        print(f"    {c:<10}{counts[c]:>16,}  {100 * counts[c] / counts['total']:5.1f}%")
    print(f"    {'total':<10}{counts['total']:>16,}  ({counts['total'] / 1e6:.1f}M)")
    if "note" in info:
        print(info["note"])
    return 0
