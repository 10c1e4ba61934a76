"""Dropout is off in the training forward of DPO, reward modelling, PPO and GRPO by default (their
losses compare it with an eval-mode forward), kept for SFT, and `model.disable_dropout` overrides
both ways. With model.dropout = 0.1, off: the first DPO step is exactly pi = pi_ref (loss log 2,
margin 0) and the first PPO/GRPO ratio is 1; kept: neither holds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.test_preference_train import write_pairs

from qatune.config import load_config
from qatune.methods import method_class
from qatune.methods.config import TrainConfig
from qatune.methods.online import loss as online
from qatune.model.gpt2 import GPT2, GPT2Config
from qatune.model.unwrap import backbone
from qatune.train.runtime import make_model, run

CONFIG = """
out_dir: {out}
tokenizer: {tok}
model: {{name: gpt2, init: random, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64, dropout: 0.1}}
data: {{sources: [{data}], max_len: 64, template: plain}}
batch: {{size: 4}}
optim: {{lr: 1e-3, warmup_steps: 0}}
eval: {{fraction: 0.1, every: 0, batch_size: 4}}
dpo: {{beta: 0.5}}
rl: {{prompts_per_rollout: 4, group_size: 2, rollout: {{max_new_tokens: 4}}}}
max_steps: 1
save_every: 0
threads: 1
precision: fp32
device: cpu
tensorboard: false
plots: false
export: false
"""


def probed(cls):
    """The method, its step first checking whether two training forwards of its batch agree."""

    class Probe(cls):
        deterministic: list[bool] = []

        def step(self, model, batch, monitor=False):
            b, net = getattr(batch, "batch", batch), backbone(model)
            if net.training:  # not the held-out evaluation's forwards
                with torch.no_grad():
                    run = lambda: net(b.input_ids, position_ids=b.position_ids, doc_ids=b.doc_ids)
                    self.deterministic.append(torch.equal(run(), run()))
            return super().step(model, batch, monitor)

    return Probe


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropout")
    qa = root / "qa.jsonl"
    qa.write_text(
        "".join(json.dumps({"question": f"What is {a} plus 2?", "answer": str(a + 2)}) + "\n" for a in range(40))
    )
    return root, qa, write_pairs(root / "pairs.jsonl", 40)


def train(data, tokenizer_dir, gpt2_tokenizer, method: str, *overrides: str):
    root, qa, pairs = data
    source = pairs if method in ("dpo", "reward") else qa
    text = CONFIG.format(out=root / "runs", tok=tokenizer_dir, data=source)
    (root / "run.yaml").write_text(text)
    name = "_".join([method, *overrides]).replace("=", "-")
    cfg = load_config(TrainConfig, root / "run.yaml", [f"method={method}", f"name={name}", *overrides])
    m = probed(method_class(method)).from_config(cfg, gpt2_tokenizer)
    m.deterministic = []
    torch.manual_seed(cfg.seed)
    result = run(m, make_model(cfg.model, len(gpt2_tokenizer)), gpt2_tokenizer, cfg, progress=False)
    return m, result


@pytest.fixture
def first_ratio(monkeypatch):
    """log pi - log pi_old of the first PPO/GRPO loss chunk trained on (the first step's)."""
    seen = []
    surrogate = online.clipped_surrogate

    def record(logp, old, advantages, clip):
        seen.append((logp - old).detach().abs().max().item())
        return surrogate(logp, old, advantages, clip)

    monkeypatch.setattr(online, "clipped_surrogate", record)
    return seen


@pytest.mark.parametrize("method", ["dpo", "reward", "ppo", "grpo"])
def test_off_by_default_where_the_loss_compares_two_forwards(
    data, tokenizer_dir, gpt2_tokenizer, first_ratio, method, capfd
):
    m, result = train(data, tokenizer_dir, gpt2_tokenizer, method)
    first = result.history[0]
    if method == "dpo":  # the training forward is the reference's eval forward
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["margin"] == 0.0
    if method in ("ppo", "grpo"):  # ratio 1 up to the decoder's and the packed forward's fp32 rounding
        assert first_ratio[0] < 1e-5
    assert all(m.deterministic) and m.deterministic
    assert f"method {method} trains without dropout" in capfd.readouterr().err


@pytest.mark.parametrize("method", ["dpo", "reward", "ppo", "grpo"])
def test_disable_dropout_false_keeps_it(data, tokenizer_dir, gpt2_tokenizer, first_ratio, method):
    m, result = train(data, tokenizer_dir, gpt2_tokenizer, method, "model.disable_dropout=false")
    assert not any(m.deterministic)
    first = result.history[0]
    if method == "dpo":
        assert abs(first["margin"]) > 1e-4 and first["loss"] != pytest.approx(math.log(2), abs=1e-4)
    if method in ("ppo", "grpo"):
        assert first_ratio[0] > 1e-3


@pytest.mark.parametrize(("setting", "off"), [((), False), (("model.disable_dropout=true",), True)])
def test_sft_keeps_dropout_unless_told(data, tokenizer_dir, gpt2_tokenizer, setting, off):
    m, _ = train(data, tokenizer_dir, gpt2_tokenizer, "sft", *setting)
    assert m.deterministic and all(x == off for x in m.deterministic)


def test_disable_dropout_sets_every_rate_to_zero():
    from qatune.model.dropout import disable_dropout
    from qatune.model.lora import LoRAConfig, apply_lora

    model = GPT2(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=50, dropout=0.1))
    apply_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.2))
    changed = disable_dropout(model)
    assert "drop" in changed and "h.0.attn" in changed and any("lora" in n for n in changed)
    assert model.config.dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.train()
    ids = torch.randint(0, 50, (2, 16))
    assert torch.equal(model(ids), model(ids))
    assert disable_dropout(model) == []
