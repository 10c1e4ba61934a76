"""`qatune export MODEL OUT`: write a transformers-loadable GPT-2 folder (safetensors + tokenizer).

MODEL is a run folder (its final export), an exported folder, a checkpoint of a run
(`runs/x/checkpoints/step_00000400`, single-process or sharded) or a hub name. The tokenizer
config gets the run's template as a Jinja `chat_template` and its context as `model_max_length`;
`qatune.json` (template, max_len, steps …) and the model card (README.md) are kept; a checkpoint
gets a card made from its run (its config, metrics.jsonl up to its step)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qatune.cli.common import add_tokenizer_option


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face GPT2LMHeadModel folder", description=__doc__)
    p.add_argument("model", help="run folder, checkpoint folder (checkpoints/step_*), exported folder or hub name")
    p.add_argument("out", help="output folder (replaced atomically)")
    add_tokenizer_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qatune.export import exported_card, is_checkpoint_folder, load_checkpoint_model
    from qatune.model.hf_io import export_hf, from_pretrained
    from qatune.runs import META_FILE, load_tokenizer_for, read_meta, resolve_model_path
    from qatune.train.model_card import CARD_FILE

    source = Path(args.model)
    if is_checkpoint_folder(source):
        model, meta = load_checkpoint_model(source)
        tokenizer = checkpoint_tokenizer(source, args.tokenizer, meta.pop("tokenizer"))
        card = exported_card(source, meta)
    else:
        path = resolve_model_path(args.model)
        model = from_pretrained(path)
        meta = read_meta(path)
        tokenizer = load_tokenizer_for(args.model, args.tokenizer)
        card = exported_card(Path(path), meta or {}) if Path(path).is_dir() else None
    extra = {META_FILE: json.dumps(meta, indent=2, ensure_ascii=False) + "\n"} if meta else {}
    if card is not None:  # the model card: what the weights are, as the hub shows it
        extra[CARD_FILE] = card
    meta = meta or {}
    out = export_hf(model, args.out, tokenizer, extra, meta.get("template"), meta.get("max_len"))
    print(f"wrote {out} ({model.num_parameters():,} parameters)")
    return 0


def checkpoint_tokenizer(checkpoint: Path, explicit: str | None, configured: str | None):
    """--tokenizer, else the run's own export's tokenizer, else the run config's setting."""
    from qatune.model.tokenizer import load_tokenizer
    from qatune.runs import EXPORT_DIR

    run_export = checkpoint.parent.parent / EXPORT_DIR
    if explicit is None and (run_export / "tokenizer_config.json").exists():
        return load_tokenizer(run_export)
    return load_tokenizer(explicit or configured)
