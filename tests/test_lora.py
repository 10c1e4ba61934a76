"""LoRA adapters: the base is untouched at step 0 and when disabled, merging is exact, and the
saved adapter is one that peft loads onto transformers' GPT-2 with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qatune.kernels.loss import response_loss_sum
from qatune.model.hf_io import from_pretrained
from qatune.model.lora import (
    LoRAConfig,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    load_adapter,
    merge_lora,
    read_adapter_config,
    save_adapter,
)

IDS = torch.tensor(
    [[50256, 464, 3290, 318, 257, 1332, 11, 290, 340, 2499], [15496, 995, 13, 50256, 40, 588, 262, 3290, 13, 0]]
)


def logits(model, ids=IDS, **kw):
    return model.lm_head(model(ids, **kw))


def make_nonzero(model, seed=0):
    """Random adapter weights (B included), as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def base(hf_tiny_dir):
    model = from_pretrained(hf_tiny_dir)
    model.eval()
    return model


def test_step_zero_is_the_base_and_only_adapters_train(base):
    before = logits(base)
    names = apply_lora(base, LoRAConfig(r=4, alpha=8, targets=["attn.c_attn", "mlp.c_proj"]))
    assert names == ["h.0.attn.c_attn", "h.0.mlp.c_proj", "h.1.attn.c_attn", "h.1.mlp.c_proj"]
    assert torch.equal(logits(base), before)  # B starts at zero
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(base)) and len(trainable) == 8
    # Base keys keep their names (checkpoint mappings rely on them); A is r x in, B out x r.
    sd = base.state_dict()
    assert sd["h.0.attn.c_attn.weight"].shape == (192, 64)
    assert sd["h.0.attn.c_attn.lora_A.weight"].shape == (4, 64) and sd["h.0.mlp.c_proj.lora_B.weight"].shape == (64, 4)
    # A backward through the chunked loss reaches the adapters only.
    base.train()
    targets = IDS.roll(-1, 1)
    loss, _ = response_loss_sum(base(IDS), base.wte.weight, targets)
    loss.backward()
    assert all(p.grad is None for n, p in base.named_parameters() if n not in trainable)
    assert all(base.get_parameter(n).grad.abs().sum() > 0 for n in trainable if "lora_B" in n)


def test_disabled_adapters_give_the_base_exactly(base):
    doc_ids = torch.tensor([[0] * 4 + [1] * 6] * 2)
    position_ids = torch.tensor([list(range(4)) + list(range(6))] * 2)
    before = logits(base, doc_ids=doc_ids, position_ids=position_ids)
    apply_lora(base, LoRAConfig(r=4))
    make_nonzero(base)
    adapted = logits(base, doc_ids=doc_ids, position_ids=position_ids)
    assert not torch.allclose(adapted, before)
    with adapters_disabled(base):
        assert torch.equal(logits(base, doc_ids=doc_ids, position_ids=position_ids), before)
    assert torch.equal(logits(base, doc_ids=doc_ids, position_ids=position_ids), adapted)  # restored


def test_merged_model_equals_the_adapter_model(base):
    apply_lora(base, LoRAConfig(r=4, alpha=16))
    make_nonzero(base)
    merged = merge_lora(base)
    assert not any("lora" in k for k in merged.state_dict())
    # W + s*B@A folded once vs x@W + s*(x@A)@B: fp32 rounding ~1e-7 of O(1) logits (measured <= 2.2e-8)
    torch.testing.assert_close(logits(merged), logits(base), rtol=0, atol=1e-5)
    # Untouched tensors are shared with the adapted model, not copied.
    assert merged.wte.weight.data_ptr() == base.wte.weight.data_ptr()
    assert merged.h[0].attn.c_attn.weight.data_ptr() != base.h[0].attn.c_attn.weight.data_ptr()


def test_peft_loads_our_adapter_with_the_same_logits(base, hf_tiny_dir, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import GPT2LMHeadModel

    cfg = LoRAConfig(r=4, alpha=8, targets=["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
    apply_lora(base, cfg)
    make_nonzero(base)
    save_adapter(base, tmp_path / "adapter", cfg, base_model=str(hf_tiny_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["base_model_name_or_path"] == str(hf_tiny_dir)

    hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_tiny_dir), tmp_path / "adapter").eval()
    # Every adapter tensor peft expects came from our file (none left at its init).
    ours = {"base_model.model.transformer." + k for k in adapter_state_dict(base)}
    assert set(get_peft_model_state_dict(hf)) == ours
    with torch.no_grad():
        theirs = hf(IDS).logits
    torch.testing.assert_close(theirs, logits(base), rtol=0, atol=1e-5)  # peft's fp32 order: measured <= 2.2e-8

    # And back: a fresh model loads the adapter (applying it first) to the same logits.
    again = from_pretrained(hf_tiny_dir).eval()
    assert load_adapter(again, tmp_path / "adapter") == cfg
    torch.testing.assert_close(logits(again), logits(base), rtol=0, atol=0)


def test_loads_an_adapter_peft_trained(hf_tiny_dir, tmp_path):
    """A peft adapter with GPT-2's usual `target_modules=["c_attn"]` is read and loaded onto ours."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    peft_cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    hf = get_peft_model(GPT2LMHeadModel.from_pretrained(hf_tiny_dir), peft_cfg).eval()
    hf.save_pretrained(tmp_path / "peft")
    cfg = read_adapter_config(tmp_path / "peft")
    assert (cfg.r, cfg.alpha, cfg.targets) == (2, 4.0, ["attn.c_attn"])
    ours = from_pretrained(hf_tiny_dir).eval()
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(logits(ours), hf(IDS).logits, rtol=0, atol=1e-5)  # fp32: measured <= 1.5e-8


def test_adapter_errors_name_the_file_and_field(base, tmp_path):
    cfg = LoRAConfig(r=2)
    apply_lora(base, cfg)
    save_adapter(base, tmp_path / "a", cfg)
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora=True is not supported"):
        read_adapter_config(tmp_path / "a")
    config_file.write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match="differ from the adapter's config"):
        load_adapter(base, tmp_path / "a")
    config_file.write_text(json.dumps(config))
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    tensors.pop("base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight")
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: missing keys: h.1.mlp.c_fc.lora_B.weight"):
        load_adapter(base, tmp_path / "a")
    with pytest.raises(ValueError, match="lora.targets"):
        LoRAConfig(targets=["attn.q_proj"])


def test_dropout_only_in_train_mode(base):
    apply_lora(base, LoRAConfig(r=4, dropout=0.5))
    make_nonzero(base)
    base.eval()
    evaluated = logits(base)
    torch.testing.assert_close(logits(base), evaluated, rtol=0, atol=0)
    base.train()
    torch.manual_seed(0)
    first = logits(base)
    second = logits(base)
    assert not torch.allclose(first, second) and not torch.allclose(first, evaluated)
    with adapters_disabled(base):  # the base path has no dropout (model dropout is 0)
        base_train = logits(base)
    base.eval()
    with adapters_disabled(base):
        torch.testing.assert_close(logits(base), base_train, rtol=0, atol=0)


def test_activation_checkpointing_and_bf16_give_the_same_gradients(base):
    apply_lora(base, LoRAConfig(r=4))
    make_nonzero(base)
    base.train()
    targets = IDS.roll(-1, 1)

    def grads(checkpointing, dtype=None):
        base.zero_grad(set_to_none=True)
        base.activation_checkpointing = checkpointing
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            hidden = base(IDS)
        loss, _ = response_loss_sum(hidden, base.wte.weight, targets, compute_dtype=dtype)
        loss.backward()
        return {n: p.grad.clone() for n, p in adapter_state_dict(base).items()}

    plain, checkpointed = grads(False), grads(True)
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)
    low = grads(False, torch.bfloat16)
    for n in plain:
        # bf16 keeps 8 bits (~0.4% per rounding) through the backward: 5% of the scale (measured <= 0.35 of it)
        torch.testing.assert_close(low[n], plain[n], rtol=0.1, atol=0.05 * plain[n].abs().max().item())
