"""The RL tests' starting point on the demo's facts task (capitals and continents): an SFT model
trained with the demo's recipe, stopped early (about half the held-out questions right, room for
RL to improve), the task's questions, and the config file of the CLI runs. Built once per test
session by the `facts` fixture (tests/conftest.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from qatune.config import load_config
from qatune.methods.config import TrainConfig

SFT_STEPS = 110  # the demo's recipe stopped early: ~55% held-out exact match, room for RL

CONFIG = """
out_dir: {out}
tokenizer: {tok}
model: {{name: {model}}}
data: {{sources: [{data}], template: plain, max_len: 64}}
batch: {{size: 32}}
optim: {{lr: 3e-4, lr_min: 3e-4, warmup_steps: 0, betas: [0.9, 0.98], weight_decay: 0.0}}
eval: {{fraction: 0.05, every: 0}}
rl:
  prompts_per_rollout: 4
  group_size: 4
  rollout: {{max_new_tokens: 6, temperature: 0.5}}
  kl_coef: 0.04
max_steps: 6
save_every: 3
precision: fp32
device: cpu
threads: 1
tensorboard: false
plots: false
"""


def items(questions, template):
    """The questions as the online methods' prompt items (prompt through the template, answer)."""
    from qatune.generation.batch import PromptItem

    return [
        PromptItem(f"facts:{i}", "facts", q.question, template.render_prompt(q.question), q.answer)
        for i, q in enumerate(questions)
    ]


def make_facts(root: Path) -> dict:
    """The SFT starting point (exported to root/sft/export), the task, and the config file."""
    from qatune.data.templates import get_template
    from qatune.demo.run import DemoSettings, encode, train_config
    from qatune.demo.task import make_task
    from qatune.demo.tokenizer import demo_tokenizer
    from qatune.launch import fit
    from qatune.train.runtime import make_model

    template = get_template("plain")
    train_qs, test_qs = make_task(0)
    # The demo's own 512-token byte-level BPE: the LM head over GPT-2's 50,257 tokens would be most
    # of every rollout and step here, for no difference to what is tested.
    corpus = [template.render_prompt(q.question) + template.render_response(q.answer) for q in train_qs + test_qs]
    tok, _ = demo_tokenizer("builtin", corpus)
    cfg = train_config(DemoSettings(steps=SFT_STEPS, out_dir=str(root), name="sft"))
    cfg = replace(cfg, precision="fp32", plots=False, tensorboard=False)
    torch.manual_seed(0)
    model = make_model(cfg.model, len(tok))
    result = fit(model, tok, encode(train_qs, tok, template), cfg, template.to_dict(), progress=False)
    data = root / "facts.jsonl"
    data.write_text("".join(json.dumps({"question": q.question, "answer": q.answer}) + "\n" for q in train_qs))
    config = root / "rl.yaml"
    config.write_text(CONFIG.format(out=root / "runs", tok=result.export_dir, model=result.export_dir, data=data))
    return {"root": root, "tok": tok, "template": template, "train": train_qs, "test": test_qs, "config": config}


def facts_config(facts: dict, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, facts["config"], list(overrides))


def sft_model(facts: dict):
    """A fresh copy of the SFT starting point."""
    from qatune.model.hf_io import from_pretrained

    return from_pretrained(Path(facts["root"]) / "sft" / "export")
