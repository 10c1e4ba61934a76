"""Every shipped YAML in configs/ parses into a TrainConfig, and says what its comments claim."""

from __future__ import annotations

from pathlib import Path

import pytest

from qatune.config import ConfigError, load_config
from qatune.methods.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {
        "gpt2-large-sft.yaml",
        "gpt2-large-lora.yaml",
        "gpt2-medium-sft.yaml",
        "gpt2-sft.yaml",
        "tiny-cpu.yaml",
        "gpt2-dpo.yaml",
        "gpt2-grpo.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.data.sources, f"{path.name} names no data"
    assert cfg.optim.lr_min <= cfg.optim.lr
    assert cfg.optim.grad_clip > 0


def test_gpt2_large_is_the_seeds_setting():
    cfg = load_config(TrainConfig, CONFIGS[0].with_name("gpt2-large-sft.yaml"))
    assert cfg.model.name == "gpt2-large" and cfg.model.init == "pretrained"
    assert cfg.data.max_len == 1024
    assert 1e-5 <= cfg.optim.lr <= 1e-4 and cfg.optim.warmup_steps > 0
    assert cfg.optim.grad_clip == 1.0 and cfg.precision == "bf16"
    assert cfg.batch.accumulation > 1 and cfg.activation_checkpointing
    assert cfg.optim.betas == (0.9, 0.95)


def test_gpt2_large_lora_fits_16_gb_as_planned():
    """The LoRA config's comment quotes `qatune plan`; the plan of what it trains fits 16 GB."""
    from qatune.analysis.memory import plan_memory
    from qatune.analysis.setup import PlanSetup
    from qatune.model.gpt2 import SIZES

    cfg = load_config(TrainConfig, CONFIGS[0].with_name("gpt2-large-lora.yaml"))
    lora = cfg.model.lora
    assert cfg.model.name == "gpt2-large" and lora is not None and lora.r == 16
    rows = cfg.batch.size // cfg.data.max_len
    s = PlanSetup(
        SIZES["gpt2-large"],
        seq_len=cfg.data.max_len,
        micro_batch=rows,
        precision=cfg.precision,
        checkpointing=cfg.activation_checkpointing,
        packed=cfg.batch.strategy == "packed",
        lora_r=lora.r,
        lora_targets=tuple(lora.targets),
        device="cuda",
    )
    need = plan_memory(s).total_with_allowance
    assert need <= 16e9
    assert f"{need / 1e9:.1f} GB per GPU" in CONFIGS[0].with_name("gpt2-large-lora.yaml").read_text()


def test_overrides_and_unknown_keys():
    path = CONFIGS[0].with_name("tiny-cpu.yaml")
    cfg = load_config(TrainConfig, path, ["optim.lr=3e-4", "batch.accumulation=4", "max_steps=7"])
    assert (cfg.optim.lr, cfg.batch.accumulation, cfg.max_steps) == (3e-4, 4, 7)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'"):
        load_config(TrainConfig, path, ["optim.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(TrainConfig, path, ["precision=fp8"])


def test_gpt2_dpo_config():
    cfg = load_config(TrainConfig, CONFIGS[0].with_name("gpt2-dpo.yaml"))
    assert cfg.method == "dpo" and cfg.dpo.beta == 0.1 and cfg.dpo.precompute_reference
    assert cfg.data.template == "hh" and cfg.data.truncation == "cut_pair"
    with pytest.raises(ValueError, match="dpo.beta"):
        load_config(TrainConfig, CONFIGS[0].with_name("gpt2-dpo.yaml"), ["dpo.beta=0"])
