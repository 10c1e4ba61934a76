"""Evaluate a model on a held-out set: response-only loss and perplexity, then generation metrics.

The loss uses the training path exactly: the same template, max_len and truncation policy
(`load_examples`), one example per row, and `response_loss_sum` — the mean over every response
token of the set, so it is comparable with the eval loss `qatune train` logs. Generation answers
every record's prompt (rendered through the same template) into a resumable generations file, and
the metrics are computed from that file's records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qatune.data.batching import collate
from qatune.data.encode import stop_ids, strip_final_eos
from qatune.data.example import EncodedExample
from qatune.data.model_template import ModelTemplate
from qatune.data.pipeline import DataConfig, load_examples
from qatune.data.readers import read_records
from qatune.data.records import Message, Record
from qatune.data.templates import Template
from qatune.errors import UserError
from qatune.generation.batch import PromptItem, generate_to_file
from qatune.generation.metrics import summarize, summarize_by_source
from qatune.generation.sampling import SamplingConfig
from qatune.kernels.loss import perplexity, response_loss_sum
from qatune.model.attention import DecoderLM

SHOWN_EXAMPLES = 5


@dataclass
class EvalSettings:
    sampling: SamplingConfig
    batch_size: int = 8
    examples_shown: int = SHOWN_EXAMPLES


def prompt_item(record: Record, template: Template | ModelTemplate) -> PromptItem:
    """The generation prompt of a record: its prompt through the template, or for a conversation,
    the history up to its last assistant turn; the reference is that answer. The model's own chat
    template (bound to its tokenizer) renders the history whole: apply_chat_template's prompt."""
    reference = strip_final_eos(record.reference)
    # Every accepted answer (SQuAD-style sets), also when a system prompt made the record a conversation.
    references = [strip_final_eos(r) for r in record.references] if record.references else None
    if isinstance(template, ModelTemplate):
        # Earlier answers without a literal end-of-text, as training renders them (`encode.record_messages`).
        history = [
            Message(m.role, strip_final_eos(m.content), m.context) if m.role == "assistant" else m
            for m in record_history(record)
        ]
        text = template.generation_prompt(history)
        return PromptItem(record.where, record.source, history[-1].content, text, reference, references, whole=True)
    if not record.is_conversation:
        text = template.render_prompt(record.prompt, record.context)
        return PromptItem(record.where, record.source, record.prompt, text, reference, references)
    history = record_history(record)
    pieces = template.generation_pieces(history)
    text = "".join(pieces)
    return PromptItem(record.where, record.source, history[-1].content, text, reference, references, pieces)


def record_history(record: Record) -> list[Message]:
    """The messages the record's answer follows: its prompt (and passage) as a user turn, or a
    conversation up to its last assistant turn, which must answer a user turn."""
    if not record.is_conversation:
        return [Message("user", record.prompt, record.context)]
    last = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
    history = record.messages[:last]
    if not history or history[-1].role != "user":
        raise UserError(f"{record.where}: the last assistant turn does not answer a user turn")
    return history


def _loss_entry(total: float, count: int, examples: int) -> dict:
    loss = total / count if count else float("nan")
    return {"response_loss": loss, "perplexity": perplexity(loss), "label_tokens": count, "examples": examples}


@torch.inference_mode()
def response_loss(model: DecoderLM, examples: Sequence[EncodedExample], pad_id: int, batch_size: int = 8) -> dict:
    """Mean cross-entropy over all response tokens, overall and per source.

    Rows of similar length are batched, right-padded; with causal attention a real token never
    sees a pad, so no mask is needed and each row's sum equals the example's alone."""
    model.eval()
    device = model.head_weight.device
    sums: dict[str, list[float]] = {}
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        batch = collate([[e] for e in chunk], pad_id).to(device)
        hidden = model(batch.input_ids, position_ids=batch.position_ids)
        for row, example in enumerate(chunk):
            part, n = response_loss_sum(hidden[row], model.head_weight, batch.targets[row])
            acc = sums.setdefault(example.source, [0.0, 0, 0])
            acc[0] += float(part)
            acc[1] += n
            acc[2] += 1
    total = [sum(v[k] for v in sums.values()) for k in range(3)]
    report = _loss_entry(total[0], int(total[1]), int(total[2]))
    report["by_source"] = {s: _loss_entry(v[0], int(v[1]), int(v[2])) for s, v in sorted(sums.items())}
    return report


def warnings_for(gen: dict, max_new_tokens: int) -> list[str]:
    """Problems a reader must see: generations that never stopped, prompts that were cut."""
    out = []
    n, no_eos = gen["n"], gen["no_eos"]
    if n and no_eos == n:
        out.append(
            f"the model never emitted EOS: all {n} generations ran to max_new_tokens={max_new_tokens}; "
            "it was not trained to stop (is EOS in its training labels?)"
        )
    elif no_eos:
        share = f"{no_eos / n:.1%}"
        out.append(f"{no_eos} of {n} generations ({share}) reached max_new_tokens={max_new_tokens} without EOS")
    if gen.get("prompts_cut"):
        out.append(f"{gen['prompts_cut']} prompts were longer than the context allows and were cut from the left")
    return out


def data_warnings(truncation: dict) -> list[str]:
    """What truncation did to the loss's examples, so a loss over fewer examples is never a surprise."""
    t = truncation
    where = f"truncation '{t['policy']}' at max_len {t['max_len']}"
    out = []
    if t["dropped"]:
        out.append(
            f"{t['dropped']} of {t['examples_in']} examples are left out of the loss under {where} "
            f"({t['no_loss']} had no response token left)"
        )
    if t["truncated"]:
        shortened = f"{t['truncated']} examples were shortened for the loss under {where}"
        out.append(f"{shortened} ({t['eos_lost']} lost their EOS)")
    return out


def evaluate_model(
    model: DecoderLM,
    tokenizer,
    data: DataConfig,
    generations_file: str | Path,
    settings: EvalSettings,
    label: str,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The report of one model on one data set (see docs/eval.md for the fields)."""
    loaded = load_examples(data, tokenizer)
    loss = response_loss(model, loaded.examples, tokenizer.eos_token_id, settings.batch_size)
    records = read_records(data.sources, data.mapping, data.skip_bad, data.limit).records
    items = [prompt_item(r, loaded.template) for r in records]
    gen_settings = {"model": label, "template": loaded.template.to_dict(), "data": list(data.sources)}
    stops = stop_ids(loaded.template, tokenizer)  # EOS, and `<|im_end|>` for a ChatML-trained model
    out = generate_to_file(
        model, tokenizer, items, generations_file, settings.sampling, settings.batch_size, gen_settings, progress, stops
    )
    generation = summarize(out)
    generation["prompts_cut"] = sum(1 for r in out if r["prompt_cut"])
    generation["max_new_tokens"] = settings.sampling.max_new_tokens
    generation["by_source"] = summarize_by_source(out)
    return {
        "model": label,
        "template": loaded.template.name,
        "max_len": data.max_len,
        "truncation": data.truncation,
        "data": list(data.sources),
        "data_report": loaded.report.to_dict(),
        "loss": loss,
        "generation": generation,
        "sampling": asdict(settings.sampling),
        "generations_file": str(generations_file),
        "examples": [_shown(r) for r in out[: settings.examples_shown]],
        "warnings": loaded.report.warnings
        + data_warnings(loaded.report.truncation.to_dict())
        + warnings_for(generation, settings.sampling.max_new_tokens),
    }


def _shown(record: dict) -> dict:
    keys = ("index", "where", "prompt", "reference", "generation", "exact_match", "f1", "stopped_at_eos")
    return {k: record[k] for k in keys}
