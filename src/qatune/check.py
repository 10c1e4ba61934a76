"""`qatune check`: a run's correctness on the user's own config and data, in seconds, before a long
run. Every check calls the code the run itself will call — the data pipeline, the method's step,
the runtime's accumulation, checkpoint, resume and export — on a sample of the data:

  mask audit          loss tokens are exactly each answer (+ EOS), never prompt text; the packed
                      batch the step sees carries exactly the examples' label tokens
  packed = unpacked   the step's loss on packed rows equals one example per row
  accumulation        one micro-batch of N == N/2 micro-batches of 2 accumulated (loss, gradients)
  save / resume       2 steps straight == 1 step, a kill, --resume, 1 step (the runtime, for real)
  export              the export loads in transformers with the same logits
  chat template       the exported tokenizer's apply_chat_template gives the ids training feeds the
                      model (for `template: model`, whole conversations, generation prompts and, where
                      the template marks them, the assistant mask), or names the first differing token
  truncation          what max_len and the policy do to the sample (WARN: over 2% dropped)
  memory plan         the planner's peak for this config against the device's memory

    report = run_checks(cfg, sample=64)
    report.ok, report.results, report.example   # example: (text, in the loss, tokens) spans

The invariance checks run in fp32, where they must hold to rounding; the round trip runs the
configured precision.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qatune.data.batching import pad_id
from qatune.data.chat_template import QATUNE_JINJA
from qatune.data.encode import encode_pieces, record_messages, strip_final_eos
from qatune.data.example import IGNORE, EncodedExample
from qatune.data.model_template import ModelTemplate
from qatune.data.pipeline import read_and_encode
from qatune.data.report import TruncationCounts
from qatune.data.truncation import DROP_WARN_SHARE, apply, best_policy, plan
from qatune.errors import UserError
from qatune.utils.device import default_device

INVARIANCE_RTOL = 1e-5  # fp32: sums in another order differ by rounding only
EXAMPLES_PER_CHECK = 8


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    warn: bool = False  # passed, but the run will not see the data as given (exit status stays 0)

    @property
    def status(self) -> str:
        return "FAIL" if not self.ok else "WARN" if self.warn else "PASS"


@dataclass
class CheckReport:
    results: list[CheckResult] = field(default_factory=list)
    # The first example as (text, in the loss, tokens) spans: each span of tokens with the same loss
    # flag is decoded whole, so a character that takes several byte tokens (Vietnamese "ộ" is 2-3
    # GPT-2 tokens) is shown, not one U+FFFD per token.
    example: list[tuple[str, bool, int]] = field(default_factory=list)
    example_where: str = ""
    notes: list[str] = field(default_factory=list)  # data warnings and notes

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def add(self, name: str, ok: bool, detail: str, warn: bool = False) -> None:
        self.results.append(CheckResult(name, ok, detail, warn))


class _Killed(Exception):
    """Raised from the runtime's step callback to stop a run the way a kill would."""


@dataclass
class Sample:
    records: list  # Record
    encodings: list  # Encoding, untruncated
    examples: list  # EncodedExample | None (dropped), aligned with encodings
    counts: TruncationCounts
    would_fail: int  # over max_len under truncation=error


def load_sample(cfg, tokenizer, n: int) -> tuple[Sample, list[str]]:
    """The first `n` records through the data pipeline, truncated as training truncates."""
    data = dataclasses.replace(cfg.data, limit=min(n, cfg.data.limit or n))
    read, encodings = read_and_encode(data, tokenizer)
    counts = TruncationCounts(data.truncation, data.max_len)
    examples, would_fail = [], 0
    for enc in encodings:
        outcome = plan(enc, data.truncation, data.max_len, raise_errors=False)
        would_fail += outcome.error
        example = apply(enc, outcome)
        counts.add(len(enc), enc.n_label_tokens, outcome, None if example is None else example.n_label_tokens)
        examples.append(example)
    notes = [f"warning: {w}" for w in read.warnings] + [f"note: {n}" for n in read.notes]
    return Sample(read.records, encodings, examples, counts, would_fail), notes


# --- data checks ------------------------------------------------------------------------------


def trained_answers(record, train_on_turns: str) -> list[str]:
    if not record.is_conversation:
        return [strip_final_eos(record.response)]
    answers = [strip_final_eos(m.content) for m in record.messages if m.role == "assistant"]
    return answers if train_on_turns == "all" else answers[-1:]


def loss_runs(labels: list[int]) -> list[list[int]]:
    """The runs of consecutive loss tokens."""
    runs, run = [], []
    for t in [*labels, IGNORE]:
        if t != IGNORE:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    return runs


def chat_mask_problem(record, enc, template: ModelTemplate, tokenizer, train_on_turns: str) -> str | None:
    """`mask_problem` for the model's own chat template: each run of loss tokens reads one answer
    (up to the whitespace the template trims) followed by the template's end-of-turn token."""
    answers = trained_answers(record, train_on_turns)
    end = template.end_of_turn().strip()
    runs = [tokenizer.decode(run).strip() for run in loss_runs(enc.labels)]
    for text, answer in zip(runs, answers):
        if not text.endswith(end) or text[: len(text) - len(end)].strip() != answer.strip():
            return f"the loss reads {text[:60]!r} for the answer {answer[:40]!r} + {end!r}"
    if len(runs) != len(answers):
        return f"{len(runs)} trained segments for {len(answers)} answers"
    return None


def mask_problem(record, enc, template, tokenizer, train_on_turns: str) -> str | None:
    """What is wrong with one example's loss mask, or None. The loss must read, answer by answer,
    exactly the record's answer (up to the whitespace the template puts before it) followed by
    EOS: any other text in the loss is prompt or template text the model would learn to write."""
    if isinstance(template, ModelTemplate):
        return chat_mask_problem(record, enc, template, tokenizer, train_on_turns)
    eos = tokenizer.eos_token_id
    answers = trained_answers(record, train_on_turns)
    loss = [t for t in enc.labels if t != IGNORE]
    want = [i for a in answers for i in encode_pieces([template.render_response(a)], tokenizer) + [eos]]
    segments, current = [], []
    for t in loss:
        if t == eos:
            segments.append(tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    if current:
        return f"the loss ends without EOS: {tokenizer.decode(current)[-40:]!r}"
    for text, answer in zip(segments, answers):
        if text.strip() != answer.strip():
            return f"the loss reads {text[:60]!r} for the answer {answer[:40]!r}"
    if len(segments) != len(answers) or loss != want:
        return f"{len(segments)} trained segments for {len(answers)} answers"
    return None


def check_mask(report: CheckReport, sample: Sample, cfg, template, tokenizer) -> None:
    bad = []
    for record, enc in zip(sample.records, sample.encodings):
        problem = mask_problem(record, enc, template, tokenizer, cfg.data.train_on_turns)
        if problem:
            bad.append((record.where, problem))
    kept = [e for e in sample.examples if e is not None][:EXAMPLES_PER_CHECK]
    from qatune.data.plan import make_batch

    batch = make_batch(kept, "packed", cfg.data.max_len, pad_id(tokenizer))
    in_batch = int((batch.targets != IGNORE).sum())
    labels = sum(len([t for t in e.labels[1:] if t != IGNORE]) for e in kept)
    problems = []
    if bad:
        where, what = bad[0]
        problems.append(f"{len(bad)} of {len(sample.records)} records put other text in the loss, e.g. {where}: {what}")
    if in_batch != labels:
        problems.append(f"the packed batch has {in_batch} loss positions for {labels} label tokens")
    end = template.end_of_turn().strip() if isinstance(template, ModelTemplate) else "EOS"
    detail = "; ".join(problems) or (
        f"{len(sample.records)} records: the loss is exactly each answer + {end}, no prompt token; the packed "
        f"batch carries {in_batch} loss positions = its examples' label tokens"
    )
    report.add("mask audit", not problems, detail)


def check_truncation(report: CheckReport, sample: Sample) -> None:
    t = sample.counts
    detail = (
        f"{t.examples_in} examples, max_len {t.max_len}, {t.policy}: {t.kept} kept, {t.truncated} truncated "
        f"({t.eos_lost} lost their EOS), {t.dropped} dropped ({t.no_loss} with no loss token left)"
    )
    if sample.would_fail:
        report.add(
            "truncation", False, f"{sample.would_fail} examples exceed max_len under truncation=error; " + detail
        )
    elif not t.kept:
        report.add("truncation", False, "no example is left: " + detail)
    elif t.dropped > DROP_WARN_SHARE * t.examples_in:
        best, kept = best_policy(sample.encodings, t.max_len)
        advice = (
            f"; data.truncation={best} keeps {kept} of {t.examples_in}"
            if kept > t.kept
            else f"; no policy keeps more at this max_len (best: {best}, {kept} kept): raise data.max_len"
        )
        share = t.dropped / t.examples_in
        report.add("truncation", True, f"{100 * share:.1f}% of the examples dropped: {detail}{advice}", warn=True)
    else:
        report.add("truncation", True, detail)


def render_example(report: CheckReport, sample: Sample, tokenizer) -> None:
    """The first kept example as (text, in the loss, tokens) spans, for the highlighted rendering."""
    for record, example in zip(sample.records, sample.examples):
        if example is not None:
            report.example = loss_spans(example, tokenizer)
            report.example_where = record.where
            return


def loss_spans(example: EncodedExample, tokenizer) -> list[tuple[str, bool, int]]:
    """Runs of tokens that are all in the loss or all out of it, each decoded as one sequence."""
    spans: list[tuple[str, bool, int]] = []
    run: list[int] = []
    for i, (t, label) in enumerate(zip(example.input_ids, example.labels)):
        run.append(t)
        nxt = example.labels[i + 1] if i + 1 < len(example) else None
        if nxt is None or (nxt != IGNORE) != (label != IGNORE):
            spans.append((tokenizer.decode(run), label != IGNORE, len(run)))
            run = []
    return spans


# --- step checks ------------------------------------------------------------------------------


def _step_loss(model, method, batches, precision) -> tuple[float, list[torch.Tensor]]:
    from qatune.train.step import accumulate

    model.zero_grad(set_to_none=True)
    totals = accumulate(model, method, batches, precision)
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return totals.loss, grads


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _grad_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.double().pow(2).sum()) for y in b) ** 0.5
    return num / max(den, 1e-30)


def check_step_invariance(report: CheckReport, model, examples: list[EncodedExample], cfg, pad_id: int) -> None:
    from qatune.data.plan import make_batch
    from qatune.methods.sft import SFT
    from qatune.train.step import Precision

    device = next(model.parameters()).device
    precision = Precision("fp32", device)
    method = SFT.stepper(cfg.loss_chunk)
    n = len(examples) - len(examples) % 2
    examples = examples[:n]
    if n < 2:
        for name in ("packed = unpacked", "accumulation"):
            report.add(name, False, f"the sample has {n} usable examples; need 2")
        return
    max_len = cfg.data.max_len
    packed = make_batch(examples, "packed", max_len, pad_id)
    rows = make_batch(examples, "grouped", max_len, pad_id)
    model.train(False)  # dropout off: the same forward both ways
    loss_packed, grads_packed = _step_loss(model, method, [packed], precision)
    loss_rows, grads_rows = _step_loss(model, method, [rows], precision)
    rel, grel = _rel(loss_packed, loss_rows), _grad_rel(grads_packed, grads_rows)
    ok = rel <= INVARIANCE_RTOL and grel <= INVARIANCE_RTOL
    report.add(
        "packed = unpacked",
        ok,
        f"{n} examples in {packed.input_ids.shape[0]} packed rows vs one per row: loss {loss_packed:.6f} vs "
        f"{loss_rows:.6f} (rel {rel:.1e}), gradients rel {grel:.1e} (fp32, tolerance {INVARIANCE_RTOL:.0e})",
    )
    halves = [make_batch(examples[i : i + 2], cfg.batch.strategy, max_len, pad_id) for i in range(0, n, 2)]
    loss_acc, grads_acc = _step_loss(model, method, halves, precision)
    whole = packed if cfg.batch.strategy == "packed" else rows
    loss_one = loss_packed if whole is packed else loss_rows
    grads_one = grads_packed if whole is packed else grads_rows
    rel, grel = _rel(loss_acc, loss_one), _grad_rel(grads_acc, grads_one)
    ok = rel <= INVARIANCE_RTOL and grel <= INVARIANCE_RTOL
    report.add(
        "accumulation",
        ok,
        f"1 micro-batch of {n} vs {len(halves)} x 2 accumulated: loss rel {rel:.1e}, gradients rel {grel:.1e}",
    )


# --- the runtime round trip -------------------------------------------------------------------


def _round_trip_config(cfg, out_dir: Path, name: str, sample_size: int):
    cfg = copy.deepcopy(cfg)
    cfg.name, cfg.out_dir = name, str(out_dir)
    cfg.data.limit = min(sample_size, cfg.data.limit or sample_size)
    cfg.max_steps, cfg.epochs, cfg.save_every, cfg.keep_checkpoints = 2, 1, 1, 2
    cfg.eval.every, cfg.plots, cfg.tensorboard, cfg.export = 0, False, False, True
    cfg.tracking = []  # the check's runs must not appear in the user's MLflow / W&B
    cfg.monitor.every = 0
    return cfg


def _train(cfg, tokenizer, resume: bool = False, on_step=None):
    """What `qatune train` does (`qatune.launch.train`), with a step callback."""
    from qatune.methods import build_method
    from qatune.train.runtime import make_model, run

    # its data report is the sample's, which the truncation check gives: not printed once per run
    with contextlib.redirect_stderr(io.StringIO()):
        method = build_method(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model, len(tokenizer))
    return run(method, model, tokenizer, cfg, resume, progress=False, on_step=on_step, overwrite=not resume)


def check_round_trip(report: CheckReport, cfg, tokenizer, sample_size: int, workdir: Path) -> Path:
    """Returns the straight run's export folder (for the export and chat template checks)."""
    from qatune.model.hf_io import read_hf_state_dict

    straight = _train(_round_trip_config(cfg, workdir, "straight", sample_size), tokenizer)

    def kill_at_second_step(record: dict) -> None:
        if record["step"] == 2:
            raise _Killed

    killed = _round_trip_config(cfg, workdir, "resumed", sample_size)
    with contextlib.suppress(_Killed):  # killed after the step-1 checkpoint, as a SIGKILL would
        _train(killed, tokenizer, on_step=kill_at_second_step)
    resumed = _train(killed, tokenizer, resume=True)
    a, b = read_hf_state_dict(straight.export_dir), read_hf_state_dict(resumed.export_dir)
    exact = all(torch.equal(a[k], b[k]) for k in a)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    cuda = default_device(cfg.device).type == "cuda"  # atomics in CUDA kernels: not bit-exact
    ok = exact or (cuda and worst <= 1e-5)
    how = "bit-identical" if exact else f"max weight difference {worst:.2e}"
    report.add("save / resume", ok, f"2 steps straight vs 1 step + kill + --resume + 1 step: {how}")
    return straight.export_dir


def check_export(report: CheckReport, export_dir: Path, example: EncodedExample) -> None:
    """transformers' AutoModelForCausalLM (the class the config.json's model_type maps to: GPT-2,
    Llama, Qwen2 ...) against qatune's own load of the same folder, on the example's first tokens."""
    from transformers import AutoModelForCausalLM

    from qatune.model.families import from_pretrained

    ids = torch.tensor([example.input_ids[:64]])
    hf = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    ours = from_pretrained(export_dir).eval()
    with torch.no_grad():
        diff = float((hf(ids).logits - ours.lm_head(ours(ids))).abs().max())
    what = f"transformers {type(hf).__name__} logits vs qatune's: max difference {diff:.1e}"
    report.add("export", diff <= 1e-4, what)


def chat_message(role: str, content: str, context: str = "") -> dict:
    """A chat message as the exported template reads it: a passage rides in a `context` key."""
    return {"role": role, "content": content, **({"context": context} if context else {})}


def chat_messages(record) -> list[dict]:
    """The conversation up to the trained answer, as chat messages."""
    if record.is_conversation:
        last = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
        return [chat_message(m.role, m.content, m.context) for m in record.messages[:last]]
    return [chat_message("user", record.prompt, record.context)]


def first_difference(ours: list[int], theirs: list[int], tokenizer) -> str:
    """Where two id lists part: "token 12: training has 151645 '<|im_end|>', apply_chat_template has 198 '\\n'"."""
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    side = lambda ids: f"{ids[i]} {tokenizer.decode([ids[i]])!r}" if i < len(ids) else "nothing (it ends)"
    return f"token {i}: training has {side(ours)}, apply_chat_template has {side(theirs)}"


def hf_template_tokenizer(export_dir: Path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(export_dir)
    # Ids are compared, never fed to a model: a prompt longer than the context (one truncation will
    # cut) is still compared, without transformers' "sequence length is longer" warning.
    hf.model_max_length = int(1e30)
    return hf


def _ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def check_chat_template(report: CheckReport, export_dir: Path, sample: Sample, template, tokenizer) -> None:
    if isinstance(template, ModelTemplate):
        return check_model_chat_template(report, export_dir, sample, template, tokenizer)
    hf = hf_template_tokenizer(export_dir)
    compared, skipped, bad = 0, 0, []
    for record, enc in zip(sample.records, sample.encodings):
        messages = chat_messages(record)
        if not messages or messages[-1]["role"] != "user":
            skipped += 1
            continue
        got = _ids(hf.apply_chat_template(messages, add_generation_prompt=True))
        compared += 1
        if got != enc.input_ids[: enc.response_start]:
            bad.append(f"{record.where}, {first_difference(enc.input_ids[: enc.response_start], got, tokenizer)}")
    detail = f"{compared} of {len(sample.records)} records: apply_chat_template == the prompt ids training uses"
    if bad:
        detail = (
            f"{len(bad)} of {compared} prompts tokenize differently through apply_chat_template, e.g. {bad[0]} "
            "(a BPE merge across a prompt/answer boundary: end the template's prompt in a newline or ':')"
        )
    if skipped:
        detail += f"; {skipped} records with no user turn before the answer not compared"
    report.add("chat template", not bad and compared > 0, detail)


def model_template_problem(record, enc, template: ModelTemplate, hf, tokenizer) -> str | None:
    """How training's ids for one record differ from apply_chat_template's (the whole conversation,
    the generation prompt before the final answer, and the assistant mask where the template has
    generation markers), or None."""
    messages = template.chat(record_messages(record))
    whole = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=False)
    if _ids(whole) != enc.input_ids:
        return "the conversation, " + first_difference(enc.input_ids, _ids(whole), tokenizer)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _ids(hf.apply_chat_template(messages[:last], tokenize=True, add_generation_prompt=True))
    if prompt != enc.input_ids[: enc.response_start]:
        return "the generation prompt, " + first_difference(enc.input_ids[: enc.response_start], prompt, tokenizer)
    if template.has_generation_markers:
        mask = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ours = [int(label != IGNORE) for label in enc.labels]
        if list(mask["assistant_masks"]) != ours:
            at = next(i for i, (a, b) in enumerate(zip(ours, mask["assistant_masks"])) if a != b)
            return f"the assistant mask, token {at}: training {'trains' if ours[at] else 'masks'} it, transformers not"
    return None


def check_model_chat_template(report: CheckReport, export_dir: Path, sample: Sample, template, tokenizer) -> None:
    """`template: model`: training's ids are apply_chat_template's, token for token, through the
    exported tokenizer (its own chat template, as it is)."""
    hf = hf_template_tokenizer(export_dir)
    bad = []
    for record, enc in zip(sample.records, sample.encodings):
        if (problem := model_template_problem(record, enc, template, hf, tokenizer)) is not None:
            bad.append(f"{record.where}: {problem}")
    n = len(sample.records)
    mask = "; the assistant mask = the loss tokens" if template.has_generation_markers else ""
    detail = (
        f"{len(bad)} of {n} records differ from apply_chat_template, e.g. {bad[0]}"
        if bad
        else f"{n} records: apply_chat_template == training's ids, whole conversations and generation prompts{mask}"
    )
    report.add("chat template", not bad and n > 0, detail)


# --- memory ------------------------------------------------------------------------------------


def device_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, props.name
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "this machine's available RAM"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def check_memory(report: CheckReport, cfg, model_config, sample: Sample, device: torch.device) -> None:
    from qatune.analysis.memory import GB, advice, plan_memory
    from qatune.analysis.setup import PlanSetup
    from qatune.train.runtime import pick_precision

    max_len = min(cfg.data.max_len, model_config.n_positions)
    b = cfg.batch
    rows = max(1, b.size // max_len) if b.unit == "tokens" else b.size
    t = sample.counts
    setup = PlanSetup(
        config=model_config,
        seq_len=max_len,
        micro_batch=rows,
        accum=b.accumulation,
        precision=pick_precision(cfg.precision, device),
        zero=3 if cfg.strategy == "fsdp" else 0,
        checkpointing=cfg.activation_checkpointing,
        label_fraction=t.label_tokens_out / t.tokens_out if t.tokens_out else 0.5,
        packed=b.strategy == "packed",
        device="cuda" if device.type == "cuda" else "cpu",
        chunk_size=cfg.loss_chunk,
    )
    need = plan_memory(setup).total_with_allowance
    capacity, where = device_memory(device)
    detail = f"planned peak {need / GB:.2f} GB for {rows} rows x {max_len} tokens, {where}: {capacity / GB:.1f} GB"
    if need > capacity:
        detail += "; " + "; ".join(advice(setup, capacity, where)[1:]) + " (see `qatune plan`)"
    report.add("memory plan", need <= capacity, detail)


# --- all of it ---------------------------------------------------------------------------------


def own_template_note(template, tokenizer) -> list[str]:
    """A note when the tokenizer brings a chat template of its own (not one qatune exported) and the
    run uses one of qatune's templates instead."""
    jinja = getattr(tokenizer, "chat_template", None)
    if isinstance(template, ModelTemplate) or not isinstance(jinja, str) or jinja.startswith(QATUNE_JINJA):
        return []
    return [f"note: the tokenizer has its own chat template; data.template=model trains with it (now: {template.name})"]


def run_checks(cfg, sample_size: int = 64, workdir: str | os.PathLike | None = None) -> CheckReport:
    from qatune.model.tokenizer import load_tokenizer
    from qatune.train.runtime import make_model, model_tokenizer

    if cfg.method != "sft":
        raise UserError(f"qatune check: method {cfg.method!r} is not checked yet; it checks method sft")
    report = CheckReport()
    tokenizer = load_tokenizer(cfg.tokenizer or model_tokenizer(cfg.model))
    template = cfg.data.get_template(tokenizer)
    sample, report.notes = load_sample(cfg, tokenizer, sample_size)
    report.notes += own_template_note(template, tokenizer)
    render_example(report, sample, tokenizer)
    check_mask(report, sample, cfg, template, tokenizer)
    check_truncation(report, sample)
    device = default_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model, len(tokenizer))
    max_len = min(cfg.data.max_len, model.config.n_positions)
    kept = [e for e in sample.examples if e is not None and len(e) <= max_len]
    check_step_invariance(report, model.to(device), kept[:EXAMPLES_PER_CHECK], cfg, pad_id(tokenizer))
    with tempfile.TemporaryDirectory(prefix="qatune-check-") as tmp:
        export_dir = check_round_trip(report, cfg, tokenizer, sample_size, Path(workdir or tmp))
        check_export(report, export_dir, kept[0])
        check_chat_template(report, export_dir, sample, template, tokenizer)
    check_memory(report, cfg, model.config, sample, device)
    return report
