"""Batch generation to a JSONL file, one record per prompt, with its metrics; resumable.

Each line holds the prompt, the reference answer, the generation and its scores. Lines are
appended and fsync'ed one batch at a time, so a killed run loses at most the batch in flight; on
restart, records already in the file are skipped, and a torn last line (a write cut short) is
detected and redone. A sidecar `<file>.meta.json` records the model and sampling settings, so a
file is never silently continued with different ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from qatune.data.encode import encode_pieces
from qatune.errors import UserError
from qatune.generation.metrics import score
from qatune.generation.sampling import SamplingConfig, generate_ids
from qatune.model.attention import DecoderLM
from qatune.model.families import context_length
from qatune.utils.files import write_text_atomic


@dataclass
class PromptItem:
    """One prompt to answer: `text` is what the model sees (the template applied), `prompt` the
    user's own text, kept for the report."""

    where: str  # file:line or dataset:index, for a reader of the output
    source: str
    prompt: str
    text: str
    reference: str | None = None
    references: list[str] | None = None  # all accepted answers when there are several (the first is `reference`)
    pieces: list[str] | None = None  # a conversation's segments, tokenized apart as in training; joined: `text`
    # `text` rendered by the model's own chat template: tokenized whole with no special tokens added,
    # as `generation_ids` and apply_chat_template tokenize it (the template writes BOS itself)
    whole: bool = False


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def check_or_write_meta(out: Path, settings: dict) -> None:
    """Refuse to continue a file written with other settings; else record them."""
    f = meta_path(out)
    if out.exists() and f.exists():
        old = json.loads(f.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise UserError(
                f"{out} was written with other settings ({', '.join(changed)} differ; see {f.name}); "
                "delete it or choose another output to start over"
            )
        return
    write_text_atomic(f, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def read_done(out: Path, items: Sequence[PromptItem]) -> dict[int, dict]:
    """Records already in `out`, by index. A last line without its newline is a torn write: it is
    cut off the file so that record is generated again."""
    if not out.exists():
        return {}
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    done: dict[int, dict] = {}
    for n, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            i = record["index"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{out}:{n}: not a generation record; delete the file to start over") from None
        same = 0 <= i < len(items) and (record.get("where"), record.get("prompt")) == (items[i].where, items[i].prompt)
        if not same:
            raise UserError(f"{out}:{n}: record {i} does not match the data being generated for; delete the file")
        done[i] = record
    return done


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Prompt tokens that fit beside `max_new_tokens` new ones; an error when none do."""
    budget = context - max_new_tokens
    if budget < 1:
        raise UserError(
            f"max_new_tokens={max_new_tokens} leaves no prompt room in the model's {context}-token context; "
            f"use --max-new-tokens {context // 2} or less"
        )
    return budget


def prompt_ids(tokenizer, item: PromptItem, budget: int) -> tuple[list[int], bool]:
    """Token ids of the prompt, cut from the left to `budget` tokens when too long: the end holds
    the question and the answer cue, which the model needs most. A literal EOS text in the prompt
    (a chat history's earlier answers end with one) becomes the EOS id, as in training."""
    if item.whole:
        ids = list(tokenizer(item.text, add_special_tokens=False, return_attention_mask=False)["input_ids"])
    else:
        ids = encode_pieces(item.pieces or [item.text], tokenizer)
    return (ids[-budget:], True) if len(ids) > budget else (ids, False)


def make_record(index: int, item: PromptItem, ids: list[int], stopped: bool, cut: bool, tokenizer) -> dict:
    generation = tokenizer.decode(ids)
    record = {
        "index": index,
        "where": item.where,
        "source": item.source,
        "prompt": item.prompt,
        "reference": item.reference,
        "generation": generation,
        "generated_tokens": len(ids),
        "stopped_at_eos": stopped,
        "prompt_cut": cut,
    }
    if item.reference is not None:
        record["reference_tokens"] = len(tokenizer(item.reference).input_ids)
        record.update(score(generation, item.references or [item.reference]))
        if item.references and len(item.references) > 1:
            record["references"] = item.references
    return record


def append_batch(out: Path, records: list[dict]) -> None:
    with open(out, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def generate_to_file(
    model: DecoderLM,
    tokenizer,
    items: Sequence[PromptItem],
    out: str | os.PathLike,
    sampling: SamplingConfig,
    batch_size: int = 8,
    settings: dict | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    stops: list[int] | None = None,
) -> list[dict]:
    """Generate for every item not yet in `out`, appending records; return all records by index.
    `stops`: the ids that end an answer (`qatune.data.encode.stop_ids`), EOS alone by default.

    Remaining prompts are generated shortest first so that a batch holds similar lengths (less
    left padding). Every prompt is left room for `max_new_tokens` in the context, so its output
    does not depend on which other prompts share its batch. `on_batch(done, total)` is called
    after each batch, for progress.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = prompt_budget(context_length(model.config), sampling.max_new_tokens)
    check_or_write_meta(out, {**(settings or {}), "sampling": asdict(sampling), "n_items": len(items)})
    done = read_done(out, items)
    todo = [i for i in range(len(items)) if i not in done]
    encoded = {i: prompt_ids(tokenizer, items[i], budget) for i in todo}
    todo.sort(key=lambda i: (len(encoded[i][0]), i))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        gens = generate_ids(model, [encoded[i][0] for i in chunk], stops or tokenizer.eos_token_id, sampling)
        records = [
            make_record(i, items[i], g.ids, g.stopped_at_eos, encoded[i][1], tokenizer) for i, g in zip(chunk, gens)
        ]
        append_batch(out, records)
        done.update((r["index"], r) for r in records)
        if on_batch:
            on_batch(len(done), len(items))
    return [done[i] for i in range(len(items))]


def read_records(out: str | os.PathLike) -> list[dict]:
    """All records of a generations file, by index (for reports and tests)."""
    lines = Path(out).read_text(encoding="utf-8").splitlines()
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["index"])
