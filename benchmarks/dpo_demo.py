"""DPO changes what a model prefers, on a task whose answers can be checked: the demo's country facts.

1. SFT: the demo's GPT-2 (2 layers, d=128, random init, the GPT-2 tokenizer) trained for only
   --sft-steps on the training phrasings, so that it knows some facts and gets others wrong.
2. Pairs, one per question: chosen = the right answer; rejected = the SFT model's own greedy
   answer where that is wrong, else a distractor (the same attribute of another country). DPO
   trains on the training phrasings' pairs; the held-out phrasings' pairs (facts seen, wording
   not) are only measured.
3. From the same SFT weights, three arms of --steps steps of 32 each: DPO (`method: dpo` on the
   shared runtime; the reference is the SFT model), DPO + NLL (RPO: `dpo.nll_weight`), and, as
   the control, more SFT on the right answers of the same questions.

Measured on the held-out questions, for the SFT model and after each arm:
- exact match of the greedy answer;
- preference accuracy: the share of held-out pairs where the model gives the right answer a higher
  log-probability than the wrong one — mostly its own earlier mistake (what the model prefers);
- reward accuracy, TRL's definition: chosen's beta log pi/pi_ref > rejected's (0 before DPO by
  definition, since pi = pi_ref there).

    python -m benchmarks.dpo_demo                      # prints a table and one JSON line
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import emit
from qatune.data.batching import model_inputs
from qatune.data.pipeline import DataConfig
from qatune.data.plan import BatchConfig
from qatune.data.preference.batching import collate_pairs
from qatune.data.preference.encode import encode_pairs
from qatune.data.preference.records import PreferenceRecord
from qatune.data.templates import get_template
from qatune.demo.run import DemoSettings, answer, encode, exact_match, train_config
from qatune.demo.task import FACTS, PHRASINGS, make_task
from qatune.demo.tokenizer import demo_tokenizer
from qatune.launch import fit
from qatune.methods.config import TrainConfig
from qatune.methods.dpo import DPO
from qatune.methods.dpo.loss import DPOConfig
from qatune.methods.dpo.step import sequence_logps
from qatune.train.optim import OptimConfig
from qatune.train.runtime import make_model, run

ATTRIBUTE = {"capital": 0, "continent": 1}


def attribute_of(question: str) -> str:
    for attribute, phrasings in PHRASINGS.items():
        for p in phrasings:
            head, _, tail = p.partition("{c}")
            if question.startswith(head) and question.endswith(tail):
                return attribute
    raise ValueError(f"unknown phrasing: {question!r}")


def distractor(question: str, right: str, rng: random.Random) -> str:
    """The same attribute of another country: a wrong answer of the right kind."""
    values = sorted({facts[ATTRIBUTE[attribute_of(question)]] for facts in FACTS.values()} - {right})
    return rng.choice(values)


def pairs_for(questions, rejected: list[str], tokenizer, template):
    records = [
        PreferenceRecord("demo", f"demo:{i}", q.answer, r, prompt=q.question)
        for i, (q, r) in enumerate(zip(questions, rejected))
    ]
    return encode_pairs(records, template, tokenizer)


@torch.no_grad()
def preference_accuracy(model, pairs, eos_id: int) -> float:
    """Share of pairs whose chosen (right) answer has the higher log-probability under `model`."""
    model.eval()
    batch = collate_pairs(pairs, list(range(len(pairs))), eos_id, 128)
    logps = sequence_logps(model(**model_inputs(batch)), model.wte.weight, batch)
    return float((logps[0::2] > logps[1::2]).double().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft-steps", type=int, default=120)
    p.add_argument("--steps", type=int, default=80, help="steps of each arm after SFT")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--nll-weight", type=float, default=1.0, help="RPO's alpha in the DPO + NLL arm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=6, help="held-out answers printed")
    p.add_argument("--out", default=None, help="run folders here (default: a temp folder)")
    args = p.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="dpo_demo."))
    train_qs, test_qs = make_task(args.seed)
    template = get_template("plain")
    tokenizer, source = demo_tokenizer(None, [])
    if source == "builtin":
        sys.exit("needs the GPT-2 tokenizer: set QATUNE_TOKENIZER or put ../shared beside the checkout")
    settings = DemoSettings(out_dir=str(out), name="sft", steps=args.sft_steps, seed=args.seed)
    sft_cfg = train_config(settings)
    sft_cfg.precision = "fp32"
    torch.manual_seed(args.seed)
    model = make_model(sft_cfg.model, len(tokenizer))
    examples = encode(train_qs, tokenizer, template)
    fit(model, tokenizer, examples, sft_cfg, template.to_dict(), progress=False, overwrite=True)

    rng = random.Random(args.seed)
    said, said_before = answer(model, tokenizer, template, train_qs), answer(model, tokenizer, template, test_qs)

    def rejected(questions, answers):  # the model's own wrong answer, else a wrong one of the right kind
        return [a if a != q.answer else distractor(q.question, q.answer, rng) for a, q in zip(answers, questions)]

    own_mistakes = sum(s != q.answer for s, q in zip(said, train_qs))
    train_pairs = pairs_for(train_qs, rejected(train_qs, said), tokenizer, template)
    test_pairs = pairs_for(test_qs, rejected(test_qs, said_before), tokenizer, template)
    eos = tokenizer.eos_token_id
    before = {
        "train_exact_match": exact_match(said, train_qs),
        "exact_match": exact_match(said_before, test_qs),
        "preference_accuracy": preference_accuracy(model, test_pairs, eos),
        "reward_accuracy": 0.0,  # pi == pi_ref
    }

    sft_state = copy.deepcopy(model.state_dict())
    arms = {"SFT model": before}
    samples = {}
    for arm, nll in (("+ DPO", 0.0), ("+ DPO + NLL", args.nll_weight), ("+ SFT", None)):
        model.load_state_dict(sft_state)
        cfg = arm_config(args, sft_cfg, out, arm, nll)
        if nll is None:  # the control: the same steps of SFT on the chosen answers
            result = fit(model, tokenizer, examples, cfg, template.to_dict(), progress=False, overwrite=True)
        else:
            method = DPO(train_pairs, template.to_dict(), eval_pairs=test_pairs)
            result = run(method, model, tokenizer, cfg, progress=False, overwrite=True)
        said_after = answer(model, tokenizer, template, test_qs)
        arms[arm] = {
            "train_exact_match": exact_match(answer(model, tokenizer, template, train_qs), train_qs),
            "exact_match": exact_match(said_after, test_qs),
            "preference_accuracy": preference_accuracy(model, test_pairs, eos),
            "reward_accuracy": result.final_eval.get("eval_reward_accuracy"),
        }
        samples[arm] = said_after
    print(
        f"\ncountry facts: {len(train_qs)} training pairs ({own_mistakes} rejected = the SFT model's own wrong "
        f"answer), {len(test_qs)} held-out pairs; GPT-2 2 layers d=128, SFT {args.sft_steps} steps, then "
        f"{args.steps} steps of 32 (beta {args.beta}, lr {args.lr}, NLL weight {args.nll_weight})"
    )
    print(f"{'':<32}" + "".join(f"{arm:>14}" for arm in arms))
    labels = {
        "train_exact_match": "exact match, trained phrasings",
        "exact_match": "exact match, held-out",
        "preference_accuracy": "preference accuracy, held-out",
        "reward_accuracy": "reward accuracy, held-out",
    }
    for key, label in labels.items():
        print(f"{label:<32}" + "".join(f"{'-' if r[key] is None else f'{r[key]:.3f}':>14}" for r in arms.values()))
    print("held-out answers, SFT model -> + DPO -> + DPO + NLL:")
    for i, q in enumerate(test_qs[: args.show]):
        seen = [said_before[i], samples["+ DPO"][i], samples["+ DPO + NLL"][i]]
        print(f"  {q.question} (right: {q.answer}): " + " -> ".join(map(repr, seen)))
    line = {
        "bench": "dpo_demo",
        "sft_steps": args.sft_steps,
        "steps": args.steps,
        "beta": args.beta,
        "lr": args.lr,
        "nll_weight": args.nll_weight,
        "seed": args.seed,
        "train_pairs": len(train_pairs),
        "own_mistakes": own_mistakes,
        "heldout_pairs": len(test_pairs),
        "arms": arms,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    emit(line)


def arm_config(args, sft_cfg: TrainConfig, out: Path, arm: str, nll: float | None) -> TrainConfig:
    """DPO (nll: its NLL weight) or, with nll None, continued SFT: same steps, lr, batch of 32."""
    name = {"+ DPO": "dpo", "+ DPO + NLL": "dpo_nll", "+ SFT": "sft_more"}[arm]
    cfg = TrainConfig(
        name=name,
        method="sft" if nll is None else "dpo",
        out_dir=str(out),
        model=sft_cfg.model,
        data=DataConfig(template="plain", max_len=64),
        batch=BatchConfig(size=32, unit="examples"),
        optim=OptimConfig(lr=args.lr, lr_min=args.lr / 10, warmup_steps=10, weight_decay=0.0),
        epochs=0,
        max_steps=args.steps,
        dpo=DPOConfig(beta=args.beta, nll_weight=nll or 0.0),
        precision="fp32",
        seed=args.seed,
        device="cpu",
        threads=1,
        save_every=0,
        tensorboard=False,
    )
    cfg.eval.every = 0
    cfg.eval.fraction = 0.0
    return cfg


if __name__ == "__main__":
    main()
