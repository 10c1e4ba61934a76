"""`qatune score REWARD_MODEL_OR_RUN DATA... --out SCORES.jsonl`: a reward model's score for every
record, one JSON line each, in the data's order. Preference pairs get
{"where", "chosen", "rejected"}; prompt/response records (any SFT layout) {"where", "score"}. The
prompt is rendered with the template the model was trained with; the file is written at the end,
atomically (a failed run leaves no partial file)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qatune.cli.common import add_device_option, add_mapping_option, add_tokenizer_option, parse_mapping
from qatune.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="a reward model's score for every record (JSONL)", description=__doc__)
    p.add_argument("model", help="a reward model folder or a reward run folder (its export/ is used)")
    p.add_argument("data", nargs="+", help="files, folders, globs or hf:dataset[:split]")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--template", help="template name; default: the one saved with the model, else 'plain'")
    p.add_argument("--max-len", type=int, help="default: the model's training max_len, else its context")
    add_mapping_option(p)
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of failing")
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--batch-size", type=int, default=16)
    add_tokenizer_option(p)
    add_device_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qatune.data.pipeline import DataConfig
    from qatune.model.reward import is_reward_model, load_reward_model
    from qatune.runs import load_tokenizer_for, read_meta, resolve_model_path
    from qatune.utils.device import default_device
    from qatune.utils.files import write_text_atomic

    model_path = resolve_model_path(args.model)
    if not is_reward_model(model_path):
        raise UserError(f"{args.model} is not a reward model (a GPT2ForSequenceClassification with num_labels=1)")
    meta = read_meta(model_path) or {}
    context = int(json.loads((Path(model_path) / "config.json").read_text()).get("n_positions", 1024))
    max_len = args.max_len or meta.get("max_len") or context
    if max_len > context:
        raise UserError(f"--max-len {max_len} exceeds the model's context of {context} tokens")
    cfg = DataConfig(
        sources=list(args.data),
        mapping=parse_mapping(args.mapping),
        template=args.template or meta.get("template") or "plain",
        max_len=max_len,
        skip_bad=args.skip_bad,
        limit=args.limit,
    )
    tokenizer = load_tokenizer_for(args.model, args.tokenizer)
    rm = load_reward_model(model_path).to(default_device(args.device)).eval()
    rows, skipped = score_rows(rm, cfg, tokenizer, args.batch_size)
    write_text_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    note = f" ({skipped} bad records skipped)" if skipped else ""
    print(f"scored {len(rows)} records{note} -> {args.out}")
    return 0


def score_rows(rm, cfg, tokenizer, batch_size: int) -> tuple[list[dict], int]:
    from qatune.cli.stats import is_preference
    from qatune.data.encode import encode_records
    from qatune.data.preference.encode import encode_pairs
    from qatune.data.preference.records import read_pairs
    from qatune.data.readers import read_records
    from qatune.generation.reward_scores import fit, score_pairs

    template, eos = cfg.get_template(), tokenizer.eos_token_id
    if is_preference(cfg):
        read = read_pairs(cfg.sources, cfg.mapping, cfg.skip_bad, cfg.limit)
        pairs = encode_pairs(read.pairs, template, tokenizer)
        chosen, rejected = score_pairs(rm, pairs, eos, cfg.max_len, batch_size)
        rows = [
            {"where": p.where, "chosen": c, "rejected": r} for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist())
        ]
        return rows, read.skipped
    read = read_records(cfg.sources, cfg.mapping, cfg.skip_bad, cfg.limit)
    encodings = encode_records(read.records, template, tokenizer)
    sequences = [fit(e.input_ids[: e.response_start], e.input_ids[e.response_start :], cfg.max_len) for e in encodings]
    scores = rm.score_ids(sequences, eos, batch_size).tolist()
    return [{"where": e.where, "score": s} for e, s in zip(encodings, scores)], read.skipped
