"""`qatune demo`: train a small GPT-2 from scratch on the country-facts task, offline, in a minute.

It measures exact-match accuracy on the held-out questions before and after training, writes a
normal run folder (metrics, plots, checkpoints, a Hugging Face export that `qatune generate` and
`qatune chat` load), and prints a few answers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qatune.data.encode import encode_records
from qatune.data.example import EncodedExample
from qatune.data.pipeline import DataConfig
from qatune.data.plan import BatchConfig
from qatune.data.records import Record
from qatune.data.templates import get_template
from qatune.demo.settings import QUICK, DemoSettings  # noqa: F401 (QUICK: callers import it from here)
from qatune.demo.task import QA, make_task
from qatune.demo.tokenizer import demo_tokenizer
from qatune.generation.sampling import SamplingConfig, generate_ids
from qatune.launch import fit
from qatune.methods.config import TrainConfig
from qatune.train.config import EvalConfig, ModelConfig
from qatune.train.optim import OptimConfig
from qatune.train.runtime import TrainResult, make_model
from qatune.utils.files import write_text_atomic


@dataclass
class DemoResult:
    accuracy_before: float
    accuracy_after: float
    n_train: int
    n_test: int
    tokenizer_source: str
    seconds: float
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # question, expected, answer
    train: TrainResult | None = None


def encode(questions: list[QA], tokenizer, template) -> list[EncodedExample]:
    """Through the data pipeline's own encoder: prompt and answer tokenized apart, EOS appended."""
    records = [Record("demo", f"demo:{i}", q.question, q.answer) for i, q in enumerate(questions)]
    return [EncodedExample(e.input_ids, e.labels, "demo") for e in encode_records(records, template, tokenizer)]


def answer(model, tokenizer, template, questions: list[QA], max_new_tokens: int = 8) -> list[str]:
    prompts = [tokenizer(template.render_prompt(q.question), add_special_tokens=False).input_ids for q in questions]
    gens = generate_ids(model, prompts, tokenizer.eos_token_id, SamplingConfig(max_new_tokens=max_new_tokens))
    return [tokenizer.decode(g.ids).strip() for g in gens]


def exact_match(predicted: list[str], questions: list[QA]) -> float:
    return sum(p == q.answer for p, q in zip(predicted, questions)) / len(questions)


def train_config(s: DemoSettings) -> TrainConfig:
    return TrainConfig(
        name=s.name,
        out_dir=s.out_dir,
        model=ModelConfig(name="gpt2", init="random", n_layer=s.n_layer, n_embd=s.n_embd, n_head=4, n_positions=64),
        data=DataConfig(sources=[], template="plain", max_len=64),
        batch=BatchConfig(strategy="packed", size=s.batch_size, unit="examples"),
        optim=OptimConfig(lr=s.lr, lr_min=s.lr / 10, warmup_steps=20, betas=(0.9, 0.98), weight_decay=0.1),
        eval=EvalConfig(every=50),  # on the held-out questions (passed to fit as eval_examples)
        epochs=0,
        max_steps=s.steps,
        # bf16 matmuls where the CPU has them (AVX512-BF16/AMX): several times faster for the LM head.
        precision="bf16" if _cpu_bf16() else "fp32",
        seed=s.seed,
        device="cpu",
        threads=s.threads,
        save_every=0,
        keep_checkpoints=1,
    )


def _cpu_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def write_held_out(run_dir: Path, questions: list[QA]) -> Path:
    """The held-out questions as a question/answer JSONL, so `qatune eval` can score the run."""
    path = run_dir / "held_out.jsonl"
    lines = (json.dumps({"question": q.question, "answer": q.answer}) + "\n" for q in questions)
    write_text_atomic(path, "".join(lines))
    return path


def run_demo(s: DemoSettings, log=print) -> DemoResult:
    t0 = time.perf_counter()
    train_qs, test_qs = make_task(s.seed)
    template = get_template("plain")
    corpus = [template.render_prompt(q.question) + template.render_response(q.answer) for q in train_qs + test_qs]
    tokenizer, source = demo_tokenizer(s.tokenizer, corpus)
    log(f"task: {len(train_qs)} training questions, {len(test_qs)} held-out (facts seen, phrasing not)")
    log(f"tokenizer: {source} ({len(tokenizer)} tokens)")
    cfg = train_config(s)
    torch.manual_seed(s.seed)
    model = make_model(cfg.model, len(tokenizer))
    log(f"model: GPT-2 {s.n_layer} layers, d={s.n_embd}, {model.num_parameters() / 1e6:.1f}M parameters, random init")
    before = exact_match(answer(model, tokenizer, template, test_qs), test_qs)
    log(f"held-out exact match before training: {before:.1%}")
    train_ex, test_ex = encode(train_qs, tokenizer, template), encode(test_qs, tokenizer, template)
    result = fit(model, tokenizer, train_ex, cfg, template.to_dict(), eval_examples=test_ex, overwrite=True)
    predicted = answer(model, tokenizer, template, test_qs)
    after = exact_match(predicted, test_qs)
    log(f"held-out exact match after {result.steps} steps: {after:.1%}")
    samples = [(q.question, q.answer, p) for q, p in zip(test_qs, predicted)][: s.show]
    for question, expected, got in samples:
        mark = "ok" if got == expected else f"expected {expected!r}"
        log(f"  Q: {question}  A: {got}  [{mark}]")
    held_out = write_held_out(Path(result.run_dir), test_qs)
    seconds = time.perf_counter() - t0
    log(f"run folder: {result.run_dir} (plots in {Path(result.run_dir) / 'plots'}); {seconds:.0f} s in all")
    log(f"next: qatune eval {result.run_dir} {held_out}   |   qatune chat {result.run_dir}")
    return DemoResult(before, after, len(train_qs), len(test_qs), source, seconds, samples, result)
