"""The RLHF study: from one SFT model, four ways to spend the same number of graded answers.

RLHF as in InstructGPT (Ouyang et al. 2022) is SFT, then a reward model, then PPO on the objective
max E_{x~pi}[r(x) - beta KL(pi || pi_ref)]; without the KL term it is plain max E_{x~pi}[r(x)].
Here the "human" is a program that checks an answer against the record's reference, so every arm
can be given the same budget N of graded answers and compared on held-out questions:

  sft      more SFT: N more training examples with their reference answers
  dpo      DPO on pairs from the SFT model's own samples: K samples per training prompt (N in
           all), graded; (right, wrong) pairs of the same prompt, at most 4 per prompt
  rm+ppo   a reward model (`method: reward`) on those same pairs, then PPO against it
           (`method: ppo`, value head initialized from the reward model's score head) for N more
           samples, which the reward model scores: no further grading; beta 0.05 per token
  rm+ppo-b.5  the same with beta 0.5: ten times the KL penalty
  grpo     GRPO (`method: grpo`) with the grader as its reward: N graded samples
  grpo-b0  GRPO without the KL term (beta = 0): max E[r], nothing anchoring it to the SFT model

Every arm starts from the same SFT export, uses the same optimizer (AdamW, constant lr, no weight
decay, clip 1.0) and the shared runtime (`qatune train` through `train(cfg)`). Measured on the
held-out questions, at a few checkpoints along each arm: exact match of greedy answers; the mean
reward of answers sampled as in RL training (several per question, fixed draws: the policy's
expected reward); the KL to the SFT model of those samples (nats per answer, sum over tokens of
log pi - log pi_sft). Also the wall time of each arm, its sampling and reward-model training
included (the held-out measurements excluded).

Task: `facts` (the demo's country facts: 240 training and 80 held-out questions; the demo's GPT-2
2x128 on the GPT-2 tokenizer, SFT stopped early so that about half the held-out answers are right).

    python -m benchmarks.rlhf_study                      # plots in docs/img/rlhf_facts.png
    python -m benchmarks.rlhf_study --arms sft grpo --budget 512

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import REPO, SHARED, emit, quiet, run_settings, workdir

ARMS = ("sft", "dpo", "rm+ppo", "rm+ppo-b.5", "grpo", "grpo-b0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--points", type=int, default=4, help="checkpoints measured along each arm (facts)")
    p.add_argument("--budget", type=int, default=None, help="graded answers per arm (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(REPO / "docs" / "img"), help="plots go here")
    p.add_argument("--plot-from", default=None, help="redraw the plots from this JSON line's file (no training)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- tasks


@dataclass
class Task:
    name: str
    tokenizer: object
    template: object
    train: list  # PromptItems: the training questions with their reference answers
    test: list  # held-out PromptItems
    sft_records: list[dict]  # {"question", "answer"} rows the SFT arm trains on
    model: dict  # ModelConfig fields of the random init
    sft_steps: int
    sft_batch: int
    sft_lr: float
    reward: str
    max_new_tokens: int
    budget: int  # graded answers per arm
    samples_per_prompt: int  # K: group size, and samples per prompt for the pairs
    lr: float  # every arm's (constant) learning rate after SFT
    eval_samples: int  # sampled answers per held-out question
    points: int  # checkpoints measured per arm


def prompt_items(rows: list[dict], template, source: str):
    from qatune.generation.batch import PromptItem

    return [
        PromptItem(f"{source}:{i}", source, r["question"], template.render_prompt(r["question"]), r["answer"])
        for i, r in enumerate(rows)
    ]


def facts_task(args) -> Task:
    from qatune.data.templates import get_template
    from qatune.demo.task import make_task
    from qatune.model.tokenizer import load_tokenizer

    template = get_template("plain")
    train_qs, test_qs = make_task(args.seed)
    rows = lambda qs: [{"question": q.question, "answer": q.answer} for q in qs]
    return Task(
        "facts",
        load_tokenizer(SHARED / "tokenizer" / "gpt2"),
        template,
        prompt_items(rows(train_qs), template, "facts-train"),
        prompt_items(rows(test_qs), template, "facts-test"),
        rows(train_qs),
        {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 64},
        sft_steps=110,  # the demo's 300-step recipe stopped early: about half the held-out questions right
        sft_batch=32,
        sft_lr=3e-3,
        reward="exact_match",
        max_new_tokens=8,
        budget=1920,  # 240 training questions x 8 samples
        samples_per_prompt=8,
        lr=5e-4,
        eval_samples=8,
        points=args.points,
    )


# ---------------------------------------------------------------- shared pieces


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_config(task: Task, work: Path, name: str, model: str, method: str, steps: int, args, **sections) -> object:
    """A TrainConfig as `qatune train` would build it from YAML."""
    from qatune.config import from_dict
    from qatune.methods.config import TrainConfig

    save_every = max(1, steps // task.points)
    cfg = {
        "name": name,
        "method": method,
        "out_dir": str(work / "runs"),
        "model": {"name": model},
        "tokenizer": str(work / "sft" / "export"),  # work is the task's folder
        "data": {"template": "plain", "max_len": task.model["n_positions"]},
        "batch": {"size": 32, "unit": "examples"},
        "optim": {"lr": task.lr, "lr_min": task.lr, "warmup_steps": 0, "betas": [0.9, 0.98], "weight_decay": 0.0},
        **run_settings(args.threads, save_every=save_every),
        "max_steps": steps,
        "precision": "fp32",
        "seed": args.seed,
        "keep_checkpoints": task.points + 2,
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(TrainConfig, cfg)


def train_sft_start(task: Task, work: Path, args) -> Path:
    """The one SFT model every arm starts from (exported with the task's tokenizer)."""
    from qatune.config import from_dict
    from qatune.launch import train
    from qatune.methods.config import TrainConfig

    export = work / task.name / "sft" / "export"
    if (export / "model.safetensors").exists():
        return export
    task.tokenizer.save_pretrained(str(work / task.name / "tokenizer"))
    data = write_jsonl(work / task.name / "sft.jsonl", task.sft_records)
    steps = task.sft_steps
    cfg = from_dict(
        TrainConfig,
        {
            "name": "sft",
            "out_dir": str(work / task.name),
            "model": {"name": "gpt2", "init": "random", **task.model},
            "tokenizer": str(work / task.name / "tokenizer"),
            "data": {"sources": [str(data)], "template": "plain", "max_len": task.model["n_positions"]},
            "batch": {"strategy": "packed", "size": task.sft_batch, "unit": "examples"},
            "optim": {
                "lr": task.sft_lr,
                "lr_min": task.sft_lr / 10,
                "warmup_steps": 20,
                "betas": [0.9, 0.98],
                "weight_decay": 0.1,
            },
            **run_settings(args.threads),
            "epochs": 1,
            "max_steps": steps,
            "precision": "fp32",
            "seed": args.seed,
        },
    )
    train(cfg, progress=False, overwrite=True)
    return export


def load_policy(path: Path, config):
    """A GPT-2 from an export folder, or from a checkpoint's state (a PPO checkpoint holds the
    policy under `backbone.` beside its value head)."""
    from qatune.model.gpt2 import GPT2
    from qatune.model.hf_io import from_pretrained

    if (path / "model.safetensors").exists():
        return from_pretrained(path)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)["model"]
    policy = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith(("value_head", "critic"))}
    model = GPT2(config)
    model.load_state_dict(policy)
    return model


def sample_answers(task: Task, model, prompts, k: int, seed: int, reference=None):
    """k sampled answers per prompt at temperature 1 (as in RL training), their log-probs under the
    model and, with `reference`, under it too."""
    from qatune.generation.batch import prompt_ids
    from qatune.methods.online.method import concat_rollouts
    from qatune.rl.rollout import RolloutConfig, sample_rollout

    cfg = RolloutConfig(max_new_tokens=task.max_new_tokens, temperature=1.0)
    budget = task.model["n_positions"] - task.max_new_tokens
    ids = [prompt_ids(task.tokenizer, p, budget)[0] for p in prompts for _ in range(k)]
    parts = []
    for start in range(0, len(ids), 64):
        generator = torch.Generator().manual_seed(seed * 7919 + start)
        parts.append(
            sample_rollout(model, ids[start : start + 64], task.tokenizer.eos_token_id, cfg, generator, reference)
        )
    return concat_rollouts(parts)


def grade(task: Task, prompts, k: int, sampled) -> list[float]:
    from qatune.rl.rewards import Sample, programmatic_reward

    eos = task.tokenizer.eos_token_id
    fn = programmatic_reward(task.reward)
    samples = []
    for i, ids in enumerate(sampled.response_ids):
        p = prompts[i // k]
        text = task.tokenizer.decode([t for t in ids if t != eos])
        samples.append(Sample(p.where, p.text, text, p.reference, [], ids, bool(ids) and ids[-1] == eos))
    return fn(samples)


@torch.no_grad()
def evaluate(task: Task, model, sft_model, seed: int) -> dict:
    """Held-out: greedy exact match; mean reward of `eval_samples` sampled answers per question
    and their KL to the SFT model (nats per answer)."""
    from qatune.generation.batch import prompt_ids
    from qatune.generation.sampling import SamplingConfig, generate_ids
    from qatune.rl.kl import kl_k1
    from qatune.rl.rewards import Sample, programmatic_reward

    model.eval()
    budget = task.model["n_positions"] - task.max_new_tokens
    ids = [prompt_ids(task.tokenizer, p, budget)[0] for p in task.test]
    greedy = []
    for start in range(0, len(ids), 64):
        chunk = ids[start : start + 64]
        greedy += generate_ids(model, chunk, task.tokenizer.eos_token_id, SamplingConfig(task.max_new_tokens))
    fn = programmatic_reward(task.reward)
    answers = [
        Sample(p.where, p.text, task.tokenizer.decode(g.ids), p.reference, i, g.ids, g.stopped_at_eos)
        for p, i, g in zip(task.test, ids, greedy)
    ]
    k = task.eval_samples
    sampled = sample_answers(task, model, task.test, k, seed, reference=sft_model)
    kl = (kl_k1(sampled.logprobs, sampled.ref_logprobs) * sampled.mask).sum(-1)
    return {
        "greedy_reward": sum(fn(answers)) / len(answers),
        "sampled_reward": sum(grade(task, task.test, k, sampled)) / len(sampled.response_ids),
        "kl_to_sft": float(kl.mean()),
        "response_tokens": sum(len(g.ids) for g in greedy) / len(greedy),
    }


# ---------------------------------------------------------------- the arms


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    from qatune.train.checkpoints import list_checkpoints

    return list_checkpoints(run_dir / "checkpoints")


def arm_sft(task: Task, work: Path, sft: Path, args) -> dict:
    from qatune.launch import train

    rows = task.sft_records
    steps = max(1, task.budget // 32)
    data = write_jsonl(work / task.name / "sft_more.jsonl", rows)
    cfg = base_config(task, work / task.name, "sft", str(sft), "sft", steps, args, data={"sources": [str(data)]})
    result = train(cfg, progress=False, overwrite=True)
    return {"run": result.run_dir, "steps": steps, "graded": steps * 32, "policy_samples": 0}


def pairs_from_samples(task: Task, sft, args) -> tuple[list[dict], dict]:
    """K samples per training prompt from the SFT model, graded; up to 4 (right, wrong) pairs per
    prompt. Samples are written without the template's leading space, as the data's answers are."""
    k = task.samples_per_prompt
    prompts = task.train[: task.budget // k]
    sampled = sample_answers(task, sft, prompts, k, args.seed + 1)
    rewards = grade(task, prompts, k, sampled)
    eos = task.tokenizer.eos_token_id
    pairs = []
    for j, p in enumerate(prompts):
        texts = [task.tokenizer.decode([t for t in sampled.response_ids[j * k + i] if t != eos]) for i in range(k)]
        texts = [t[1:] if t.startswith(" ") else t for t in texts]
        right = list(dict.fromkeys(t for t, r in zip(texts, rewards[j * k : (j + 1) * k]) if r >= 1.0 and t.strip()))
        wrong = list(dict.fromkeys(t for t, r in zip(texts, rewards[j * k : (j + 1) * k]) if r < 1.0 and t.strip()))
        for c, w in [(c, w) for c in right for w in wrong][:4]:
            pairs.append({"prompt": p.prompt, "chosen": c, "rejected": w})
    stats = {"graded": len(rewards), "pass_rate": sum(rewards) / len(rewards), "pairs": len(pairs)}
    stats["pass_at_k"] = sum(any(r >= 1.0 for r in rewards[j * k : (j + 1) * k]) for j in range(len(prompts))) / len(
        prompts
    )
    return pairs, stats


def arm_dpo(task: Task, work: Path, sft: Path, args, pairs: list[dict], stats: dict) -> dict:
    from qatune.launch import train

    if not pairs:
        return {"skipped": "no (right, wrong) pair among the SFT model's samples", **stats}
    data = write_jsonl(work / task.name / "pairs.jsonl", pairs)
    steps = max(1, 2 * len(pairs) // 32)  # two passes over the pairs
    cfg = base_config(
        task, work / task.name, "dpo", str(sft), "dpo", steps, args,
        data={"sources": [str(data)], "truncation": "cut_pair"}, dpo={"beta": 0.1},
    )  # fmt: skip
    result = train(cfg, progress=False, overwrite=True)
    return {"run": result.run_dir, "steps": steps, "policy_samples": stats["graded"], **stats}


def arm_rm_ppo(task: Task, work: Path, sft: Path, args, pairs: list[dict], stats: dict, beta: float, name: str) -> dict:
    from qatune.launch import train

    if not pairs:
        return {"skipped": "no (right, wrong) pair to train a reward model on", **stats}
    data = write_jsonl(work / task.name / "pairs.jsonl", pairs)
    rm_steps = max(1, 2 * len(pairs) // 32)
    rm = base_config(
        task, work / task.name, "rm", str(sft), "reward", rm_steps, args,
        data={"sources": [str(data)], "truncation": "cut_pair"},
    )  # fmt: skip
    rm_result = train(rm, progress=False, overwrite=True)
    rm_dir = str(rm_result.export_dir)
    prompts_per_rollout = 64
    rollouts = max(1, task.budget // prompts_per_rollout)
    steps = rollouts * 4  # 2 passes x 2 minibatches per rollout
    prompts = write_jsonl(
        work / task.name / "prompts.jsonl", [{"question": p.prompt, "answer": p.reference} for p in task.train]
    )
    rl = {
        "reward": rm_dir, "value_model": rm_dir, "prompts_per_rollout": prompts_per_rollout, "group_size": 1,
        "epochs": 2, "minibatches": 2, "kl_coef": beta, "kl_band": [-5.0, 50.0],
        "rollout": {"max_new_tokens": task.max_new_tokens, "temperature": 1.0},
    }  # fmt: skip
    cfg = base_config(
        task, work / task.name, name, str(sft), "ppo", steps, args, data={"sources": [str(prompts)]}, rl=rl
    )
    result = train(cfg, progress=False, overwrite=True)
    return {
        "run": result.run_dir,
        "steps": steps,
        "policy_samples": stats["graded"] + rollouts * prompts_per_rollout,  # the pairs' samples + PPO's
        "rm_steps": rm_steps,
        **stats,
    }


def arm_grpo(task: Task, work: Path, sft: Path, args, beta: float, name: str) -> dict:
    from qatune.launch import train

    k = task.samples_per_prompt
    prompts_per_step = 16 if task.name == "facts" else 8
    steps = max(1, task.budget // (prompts_per_step * k))
    prompts = write_jsonl(
        work / task.name / "prompts.jsonl", [{"question": p.prompt, "answer": p.reference} for p in task.train]
    )
    rl = {
        "reward": task.reward, "prompts_per_rollout": prompts_per_step, "group_size": k, "kl_coef": beta,
        "kl_band": [-5.0, 50.0], "generation_batch": 64,
        "rollout": {"max_new_tokens": task.max_new_tokens, "temperature": 1.0},
    }  # fmt: skip
    cfg = base_config(
        task,
        work / task.name,
        name,
        str(sft),
        "grpo",
        steps,
        args,
        data={"sources": [str(prompts)]},
        rl=rl,
        batch={"size": 64},
    )
    result = train(cfg, progress=False, overwrite=True)
    return {
        "run": result.run_dir,
        "steps": steps,
        "graded": steps * prompts_per_step * k,
        "policy_samples": steps * prompts_per_step * k,
    }


# ---------------------------------------------------------------- run, measure, report


def run_task(task: Task, work: Path, args) -> dict:
    from qatune.model.hf_io import from_pretrained
    from qatune.train.metrics import read_metrics

    t0 = time.perf_counter()
    sft_dir = train_sft_start(task, work, args)
    sft_s = time.perf_counter() - t0
    sft = from_pretrained(sft_dir)
    start = evaluate(task, sft, sft, args.seed)
    print(f"[{task.name}] SFT start ({sft_s:.0f} s): {start}", file=sys.stderr, flush=True)
    out = {"sft_start": {**start, "wall_s": sft_s}, "arms": {}}
    pairs = stats = None
    if {"dpo", "rm+ppo", "rm+ppo-b.5"} & set(args.arms):  # these arms learn from the same graded samples
        t0 = time.perf_counter()
        pairs, stats = pairs_from_samples(task, sft, args)
        stats["sampling_s"] = time.perf_counter() - t0
        out["pairs"] = stats
    for arm in args.arms:
        t0 = time.perf_counter()
        if arm == "sft":
            info = arm_sft(task, work, sft_dir, args)
        elif arm == "dpo":
            info = arm_dpo(task, work, sft_dir, args, pairs, stats)
        elif arm.startswith("rm+ppo"):
            beta = 0.5 if arm == "rm+ppo-b.5" else 0.05
            info = arm_rm_ppo(task, work, sft_dir, args, pairs, stats, beta, arm.replace("+", "_").replace(".", ""))
        else:
            info = arm_grpo(task, work, sft_dir, args, 0.04 if arm == "grpo" else 0.0, arm.replace("+", "_"))
        info["wall_s"] = (
            time.perf_counter() - t0 + (stats["sampling_s"] if arm != "sft" and not arm.startswith("grpo") else 0.0)
        )
        if "skipped" not in info:
            run_dir = Path(info.pop("run"))
            points = [(0, None)] + [(s, p) for s, p in checkpoints(run_dir)]
            info["curve"] = []
            for step, path in points:
                model = sft if path is None else load_policy(path, sft.config)
                info["curve"].append(
                    {"step": step, "progress": step / info["steps"], **evaluate(task, model, sft, args.seed)}
                )
            info["final"] = info["curve"][-1]
            info["train_reward"] = [r["reward"] for r in read_metrics(run_dir) if "reward" in r]
        out["arms"][arm] = info
        final = info.get("final", {})
        print(
            f"[{task.name}] {arm}: {info.get('skipped') or final} ({info['wall_s']:.0f} s)", file=sys.stderr, flush=True
        )
    return out


def report(task: Task, result: dict) -> None:
    s = result["sft_start"]
    print(f"\n{task.name}: budget {task.budget} graded answers per arm; SFT start: greedy {s['greedy_reward']:.3f}, "
          f"sampled {s['sampled_reward']:.3f}  (reward: {task.reward})")  # fmt: skip
    head = f"{'arm':<11}{'steps':>6}{'graded':>8}{'samples':>9}{'greedy':>8}{'sampled':>9}{'KL to SFT':>11}"
    print(head + f"{'wall s':>7}")
    for arm, info in result["arms"].items():
        if "skipped" in info:
            print(f"{arm:<11} skipped: {info['skipped']} (SFT pass@{task.samples_per_prompt} {info['pass_at_k']:.3f})")
            continue
        f = info["final"]
        print(
            f"{arm:<11}{info['steps']:>6}{info.get('graded', 0):>8}{info['policy_samples']:>9}"
            f"{f['greedy_reward']:>8.3f}{f['sampled_reward']:>9.3f}{f['kl_to_sft']:>11.3f}{info['wall_s']:>7.0f}"
        )


def plot(name: str, result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    arms = {a: i for a, i in result["arms"].items() if "curve" in i}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm, info in arms.items():
        c, color = info["curve"], f"C{ARMS.index(arm)}"  # one color per arm in every panel
        axes[0].plot([p["progress"] for p in c], [p["greedy_reward"] for p in c], "o-", label=arm, ms=3, color=color)
        axes[1].plot([p["kl_to_sft"] for p in c], [p["sampled_reward"] for p in c], "o-", label=arm, ms=3, color=color)
        if info["train_reward"]:
            axes[2].plot(range(1, len(info["train_reward"]) + 1), info["train_reward"], label=arm, lw=1, color=color)
    axes[0].set(xlabel="share of the arm's budget spent", ylabel="held-out reward of greedy answers", title=name)
    axes[1].set(xlabel="KL to the SFT model (nats / answer)", ylabel="held-out mean reward of sampled answers")
    axes[2].set(xlabel="rollout", ylabel="training reward, mean of the rollout\n(rm+ppo: the reward model's score)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"rlhf_{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.plot_from:
        line = json.loads(Path(args.plot_from).read_text().splitlines()[0])
        for name, result in line["results"].items():
            print(plot(name, result, Path(args.out))[0])
        return
    quiet(args.threads)
    work = workdir(args.workdir, "rlhf_study")
    results = {}
    for task in [facts_task(args)]:
        task.budget = args.budget or task.budget
        results[task.name] = run_task(task, work, args)
        report(task, results[task.name])
        plot(task.name, results[task.name], Path(args.out))
    line = {"benchmark": "rlhf_study", "args": vars(args) | {"workdir": str(work)}, "results": results}
    emit(line)


if __name__ == "__main__":
    main()
