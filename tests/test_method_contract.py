"""The seam between the runtime and a method: what a method declares and the runtime enforces
(strategies, accumulation, resuming on another number of ranks), what the runtime hands it (typed
settings and its own config section), and the helpers every method shares (held-out split, pad id)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qatune.data.batching import pad_id
from qatune.data.plan import BatchConfig, held_out_split, split_holdout
from qatune.errors import UserError
from qatune.methods import METHODS, method_class
from qatune.methods.config import TrainConfig
from qatune.methods.online.config import RLConfig
from qatune.model.gpt2 import GPT2Config
from qatune.train.method import RunContext, RunSettings
from qatune.train.runtime import check_method_fits
from qatune.train.step import Precision


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_the_runtime_refuses_what_an_online_method_declares_unsupported(name):
    method = method_class(name)
    with pytest.raises(UserError, match=f"method {name}: strategy fsdp is not supported"):
        check_method_fits(method, TrainConfig(method=name, strategy="fsdp"), 1, 1)
    accumulate = TrainConfig(method=name, batch=BatchConfig(accumulation=2))
    with pytest.raises(UserError, match=f"batch.accumulation does not apply to method {name}"):
        check_method_fits(method, accumulate, 1, 1)
    with pytest.raises(UserError, match=f"this {name} run was started on 2 rank"):
        check_method_fits(method, TrainConfig(method=name), 2, 1)


@pytest.mark.parametrize("name", ["sft", "dpo", "reward"])
def test_offline_methods_take_every_strategy_accumulation_and_rank_count(name):
    cfg = TrainConfig(method=name, strategy="fsdp", batch=BatchConfig(accumulation=4))
    check_method_fits(method_class(name), cfg, 2, 1)  # no error


def test_a_method_gets_the_shared_settings_and_only_its_own_section():
    cfg = TrainConfig(method="grpo", seed=3, rl=RLConfig(kl_coef=0.2))
    cpu = torch.device("cpu")
    ctx = RunContext.for_method(cfg, method_class("grpo"), None, cpu, Precision("fp32", cpu), 0, 1, 1, ".")
    assert ctx.section is cfg.rl and ctx.settings == RunSettings.of(cfg) and ctx.settings.seed == 3
    assert not hasattr(ctx, "cfg")
    sft = RunContext.for_method(cfg, method_class("sft"), None, cpu, Precision("fp32", cpu), 0, 1, 1, ".")
    assert sft.section is None


def test_every_registered_method_names_a_section_the_config_has():
    for name in METHODS:
        for section in method_class(name).config_sections:
            assert hasattr(TrainConfig(), section), f"{name}: config section {section!r} is not in TrainConfig"


def test_the_held_out_split_is_seeded_or_the_callers_own():
    items = [f"ex{i}" for i in range(20)]
    train, held = held_out_split(items, None, 0.25, None, seed=5)
    train_idx, eval_idx = split_holdout(20, 0.25, None, 5)
    assert train == [items[i] for i in train_idx] and held == [items[i] for i in eval_idx] and len(held) == 5
    train, held = held_out_split(items, ["q"], 0.25, None, seed=5)
    assert train == items and held == ["q"]  # a held-out set given: every item trains, no split


def test_padding_uses_the_pad_token_else_eos_on_every_path(gpt2_tokenizer):
    """Padding is masked out of attention and loss; the id is EOS where the tokenizer has no pad
    token (SFT and the pair methods padded with 0 there, the online methods with EOS)."""
    no_pad = SimpleNamespace(pad_token_id=None, eos_token_id=50256)
    assert pad_id(no_pad) == 50256
    assert pad_id(SimpleNamespace(pad_token_id=7, eos_token_id=1)) == 7
    assert pad_id(None) == 0
    assert pad_id(gpt2_tokenizer) == gpt2_tokenizer.eos_token_id  # load_tokenizer sets pad = EOS


@pytest.mark.parametrize("on", [True, False])
def test_the_runtime_sets_activation_checkpointing_on_every_network_a_method_trains(on):
    """PPO with a separate critic trains two GPT-2s inside its wrapper: the runtime's setting
    reaches both (the method does not set it)."""
    from qatune.methods.ppo.method import PolicyWithValue
    from qatune.model.gpt2 import GPT2
    from qatune.train.runtime import _Run

    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    policy, critic = GPT2(config), GPT2(config)
    run = _Run.__new__(_Run)  # just the wrapping step of a run
    run.cfg = TrainConfig(method="ppo", activation_checkpointing=on)
    run.ctx = SimpleNamespace(device=torch.device("cpu"))
    run._wrap(PolicyWithValue(policy, critic))
    assert policy.activation_checkpointing is on and critic.activation_checkpointing is on
