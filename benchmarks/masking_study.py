"""The masking study: does training on the instruction too make a model copy it?

The same small GPT-2, from the same random init, is trained twice on the same examples in the same
order for the same number of steps (so the same tokens are seen):
  masked    - loss on response tokens only (qatune's default),
  unmasked  - loss on every token, instruction included (L_instruction + L_response).
Both are then measured on held-out questions: the response-only loss, exact match of greedy
answers, and how much of each generation repeats its prompt: the share of the generation's word
3-grams found in the rendered prompt ("repeats" = at least half of them, for generations of >= 3
words), and how often it writes the template's own cues ("Question:", "Answer:") again.

Two tasks:
  facts  - the demo's country-facts task (held-out phrasings of seen facts; GPT-2 tokenizer if
           found, else a BPE trained here); exact match is meaningful.
  gsm8k  - 1,500 GSM8K problems, held-out questions from its test split; a small model from scratch
           cannot solve them (exact match stays 0), but response loss and copying are measurable.
           To keep the LM head cheap on a CPU it uses a 2,048-token byte-level BPE trained on the
           training text — the study is about the loss mask, not the tokenizer.

    python -m benchmarks.masking_study [--tasks facts gsm8k] [--out docs/masking_study]

Prints a table and one JSON line; writes loss-curve plots to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import SHARED, emit
from qatune.data.encode import encode_records
from qatune.data.example import EncodedExample
from qatune.data.plan import BatchConfig
from qatune.data.readers import read_records
from qatune.data.records import Record
from qatune.data.templates import get_template
from qatune.demo.task import make_task
from qatune.demo.tokenizer import demo_tokenizer, train_bpe
from qatune.generation.evaluate import response_loss
from qatune.generation.metrics import exact_match, normalize_answer
from qatune.generation.sampling import SamplingConfig, generate_ids
from qatune.launch import fit
from qatune.methods.config import TrainConfig
from qatune.train.config import EvalConfig, ModelConfig, MonitorConfig
from qatune.train.optim import OptimConfig
from qatune.train.runtime import make_model


@dataclass
class Task:
    name: str
    train: list[Record]
    test: list[Record]
    tokenizer: object
    n_layer: int
    n_embd: int
    steps: int
    batch_size: int
    lr: float
    max_len: int
    max_new_tokens: int


def facts_task(steps: int) -> Task:
    """The demo's task; named by its step budget, so several budgets can be compared."""
    train_qs, test_qs = make_task(0)
    template = get_template("plain")
    corpus = [template.render_prompt(q.question) + q.answer for q in train_qs + test_qs]
    tokenizer, _ = demo_tokenizer(None, corpus)
    to_records = lambda qs, tag: [Record("facts", f"{tag}:{i}", q.question, q.answer) for i, q in enumerate(qs)]
    return Task(
        f"facts@{steps}",
        to_records(train_qs, "train"),
        to_records(test_qs, "test"),
        tokenizer,
        2,
        128,
        steps,
        32,
        3e-3,
        64,
        8,
    )


def gsm8k_task(steps: int) -> Task:
    folder = SHARED / "data" / "gsm8k"
    if not folder.exists():
        sys.exit(f"{folder} is absent: the gsm8k task needs ../shared/data")
    train = list(read_records([str(folder / "train.jsonl")], limit=1500))
    test = list(read_records([str(folder / "test.jsonl")], limit=100))
    tokenizer = train_bpe((r.prompt + " " + r.response for r in train), vocab_size=2048)
    return Task("gsm8k", train, test, tokenizer, 4, 192, steps, 16, 2e-3, 320, 48)


def unmask(ex: EncodedExample) -> EncodedExample:
    """Every token carries loss: L_instruction + L_response."""
    return EncodedExample(ex.input_ids, list(ex.input_ids), ex.source)


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = normalize_answer(text).split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def prompt_overlap(generation: str, prompt: str, n: int = 3) -> float | None:
    """Share of the generation's word n-grams that occur in the prompt (None if it has none)."""
    grams = word_ngrams(generation, n)
    if not grams:
        return None
    in_prompt = set(word_ngrams(prompt, n))
    return sum(g in in_prompt for g in grams) / len(grams)


def template_cues(template) -> list[str]:
    """The template's fixed text around {prompt} ("Question:", "Answer:"): a generation that
    contains one is writing the prompt's structure again instead of answering."""
    return [part.strip() for part in template.prompt.split("{prompt}") if part.strip()]


def train_arm(task: Task, examples: list[EncodedExample], name: str, out: Path, seed: int) -> tuple:
    cfg = TrainConfig(
        name=f"{task.name}-{name}",
        out_dir=str(out / "runs"),
        model=ModelConfig(
            name="gpt2", init="random", n_layer=task.n_layer, n_embd=task.n_embd, n_head=4, n_positions=task.max_len
        ),
        batch=BatchConfig(strategy="packed", size=task.batch_size, unit="examples"),
        optim=OptimConfig(lr=task.lr, lr_min=task.lr / 10, warmup_steps=20, betas=(0.9, 0.98)),
        eval=EvalConfig(fraction=0.0, every=0),
        monitor=MonitorConfig(every=0),
        epochs=0,
        max_steps=task.steps,
        precision="fp32",
        seed=seed,
        device="cpu",
        threads=1,
        save_every=0,
        keep_checkpoints=1,
        tensorboard=False,
        plots=False,
        export=False,
    )
    torch.manual_seed(seed)
    model = make_model(cfg.model, len(task.tokenizer))
    t0 = time.perf_counter()
    result = fit(model, task.tokenizer, examples, cfg, progress=False)
    return model, result.history, time.perf_counter() - t0


@torch.no_grad()
def measure(task: Task, model, test_examples: list[EncodedExample]) -> dict:
    template = get_template("plain")
    tok = task.tokenizer
    loss = response_loss(model, test_examples, tok.pad_token_id)["response_loss"]
    prompts = [template.render_prompt(r.prompt) for r in task.test]
    budget = task.max_len - task.max_new_tokens
    ids = [tok(p, add_special_tokens=False).input_ids[-budget:] for p in prompts]
    gens = generate_ids(model, ids, tok.eos_token_id, SamplingConfig(max_new_tokens=task.max_new_tokens))
    texts = [tok.decode(g.ids) for g in gens]
    overlaps = [prompt_overlap(t, p) for t, p in zip(texts, prompts)]
    measured = [o for o in overlaps if o is not None]
    cues = template_cues(template)
    return {
        "response_loss": loss,
        "exact_match": sum(exact_match(t, r.reference) for t, r in zip(texts, task.test)) / len(texts),
        "prompt_3gram_overlap": sum(measured) / len(measured) if measured else 0.0,
        "repeats_prompt": sum(o is not None and o >= 0.5 for o in overlaps) / len(texts),
        "echoes_template": sum(any(c in t for c in cues) for t in texts) / len(texts),
        "stops_with_eos": sum(g.stopped_at_eos for g in gens) / len(gens),
        "samples": [
            {"prompt": r.prompt[-120:], "reference": r.reference[:120], "generation": t[:160]}
            for r, t in list(zip(task.test, texts))[:3]
        ],
    }


def study(task: Task, out: Path, seed: int) -> dict:
    template = get_template("plain")
    train = [
        EncodedExample(e.input_ids[: task.max_len], e.labels[: task.max_len], task.name)
        for e in encode_records(task.train, template, task.tokenizer)
    ]
    test = [
        EncodedExample(e.input_ids, e.labels, task.name)
        for e in encode_records(task.test, template, task.tokenizer)
        if len(e) <= task.max_len
    ]
    arms = {}
    for name, examples in (("masked", train), ("unmasked", [unmask(e) for e in train])):
        model, history, seconds = train_arm(task, examples, name, out, seed)
        arms[name] = {
            **measure(task, model, test),
            "seconds": seconds,
            "train_loss_curve": [(r["step"], r["loss"]) for r in history],
        }
        print(f"  {task.name}/{name}: {seconds:.0f} s", file=sys.stderr)
    return arms


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (task, arms) in zip(axes[0], results.items()):
        for name, r in arms.items():
            steps, losses = zip(*r["train_loss_curve"])
            ax.plot(steps, losses, lw=1, label=f"{name} (loss on {'responses' if name == 'masked' else 'all tokens'})")
        ax.set(title=f"{task}: training loss", xlabel="step", ylabel="training loss (its own tokens)", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "masking_study.png", dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["facts", "gsm8k"], choices=["facts", "gsm8k"])
    p.add_argument("--facts-steps", type=int, nargs="+", default=[100, 300], help="one facts study per budget")
    p.add_argument("--gsm8k-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="masking_study")
    args = p.parse_args()
    out = Path(args.out)
    tasks = [facts_task(n) for n in args.facts_steps] if "facts" in args.tasks else []
    tasks += [gsm8k_task(args.gsm8k_steps)] if "gsm8k" in args.tasks else []
    results = {task.name: study(task, out, args.seed) for task in tasks}
    plot(results, out)
    header = f"| {'task':<9} | {'loss on':<10} | {'held-out response loss':>22} | {'exact match':>11} | "
    header += (
        f"{'3-gram overlap w/ prompt':>24} | {'repeats prompt':>14} | {'echoes template':>15} | {'stops w/ EOS':>12} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for task, arms in results.items():
        for name, r in arms.items():
            print(
                f"| {task:<9} | {name:<10} | {r['response_loss']:>22.3f} | {r['exact_match']:>11.1%} | "
                f"{r['prompt_3gram_overlap']:>24.1%} | {r['repeats_prompt']:>14.1%} | {r['echoes_template']:>15.1%} | "
                f"{r['stops_with_eos']:>12.1%} |"
            )
    for task, arms in results.items():
        for name, r in arms.items():
            for s in r["samples"][:2]:
                print(f"[{task}/{name}] ...{s['prompt'][-60:]!r} -> {s['generation'][:100]!r}")
    slim = {
        t: {n: {k: v for k, v in r.items() if k != "train_loss_curve"} for n, r in a.items()}
        for t, a in results.items()
    }
    emit({"benchmark": "masking_study", "results": slim})


if __name__ == "__main__":
    main()
