"""LoRA on the Llama family (Llama, Qwen2, Qwen3, Mistral), targets named as peft names them: the
saved adapter loads with `peft.PeftModel.from_pretrained` on the transformers base folder with
qatune's logits; an adapter peft trained loads onto qatune's model; merging is exact and the merged
export is what peft's own `merge_and_unload` gives; the base is untouched at step 0 and when the
adapters are disabled."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tests.test_llama import (
    hf_dirs,  # noqa: F401  (the fixture: random folders written by transformers)
    ids_of,
)
from tests.test_lora import make_nonzero

from qatune.model.llama_hf_io import export_hf, from_pretrained
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
from qatune.model.names import LLAMA_LORA_TARGETS

CASES = ["llama", "llama3-rope-tied", "qwen2", "qwen3", "mistral"]
IDS = ids_of((2, 20))


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model.lm_head(model(ids, **kw))


@pytest.fixture(params=CASES)
def case(request, hf_dirs):  # noqa: F811
    return hf_dirs(request.param)


def test_default_targets_are_every_linear_of_the_block_and_step_zero_is_the_base(hf_dirs):  # noqa: F811
    model = from_pretrained(hf_dirs("qwen2")).eval()
    before = logits(model)
    names = apply_lora(model, LoRAConfig(r=4))
    assert names == [f"layers.{i}.{path}" for i in range(2) for path in LLAMA_LORA_TARGETS.values()]
    assert torch.equal(logits(model), before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model)) and len(trainable) == 2 * 7 * 2
    # base names unchanged (checkpoint mappings rely on them); GQA: k/v's B is (kv_heads * head_dim) x r
    sd = model.state_dict()
    assert sd["layers.0.self_attn.k_proj.weight"].shape == (32, 64) and "layers.0.self_attn.q_proj.bias" in sd
    assert sd["layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    assert sd["layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 96)
    make_nonzero(model)
    assert not torch.allclose(logits(model), before)
    with adapters_disabled(model):
        assert torch.equal(logits(model), before)


def test_peft_loads_our_adapter_on_the_transformers_base_with_the_same_logits(case, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = from_pretrained(case).eval()
    cfg = LoRAConfig(r=4, alpha=8)
    apply_lora(model, cfg)
    make_nonzero(model)
    save_adapter(model, tmp_path / "adapter", cfg, base_model=str(case))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False and sorted(config["target_modules"]) == sorted(LLAMA_LORA_TARGETS)
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 7 * 2

    base = AutoModelForCausalLM.from_pretrained(case)
    hf = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert set(get_peft_model_state_dict(hf)) == keys  # every tensor peft expects came from our file
    with torch.no_grad():
        theirs = hf(IDS).logits
    torch.testing.assert_close(theirs, logits(model), rtol=0, atol=1e-5)  # fp32; measured: 0 on CPU (same op order)

    # peft's own merge and ours: the same merged weights, so the same export
    merged = merge_lora(model)
    torch.testing.assert_close(logits(merged), logits(model), rtol=0, atol=1e-5)
    export = export_hf(merged, tmp_path / "merged")
    theirs_merged = hf.merge_and_unload().eval()
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, theirs_merged(IDS).logits, rtol=0, atol=1e-5)

    # and back: a fresh model loads the adapter (applying it first) to the same logits, bit for bit
    again = from_pretrained(case).eval()
    assert load_adapter(again, tmp_path / "adapter") == LoRAConfig(r=4, alpha=8, targets=list(LLAMA_LORA_TARGETS))
    assert torch.equal(logits(again), logits(model))


def test_loads_an_adapter_peft_trained_with_q_and_v(hf_dirs, tmp_path):  # noqa: F811
    """The usual peft/TRL setting `target_modules=["q_proj", "v_proj"]`, saved by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = hf_dirs("qwen3")
    torch.manual_seed(0)
    peft_cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), peft_cfg).eval()
    hf.save_pretrained(tmp_path / "peft")
    ours = from_pretrained(folder).eval()
    cfg = read_adapter_config(tmp_path / "peft", ours)
    assert (cfg.r, cfg.alpha, cfg.targets) == (2, 6.0, ["q_proj", "v_proj"])
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(logits(ours), hf(IDS).logits, rtol=0, atol=1e-5)


def test_targets_of_the_other_family_and_mismatched_adapters_are_refused(hf_dirs, hf_tiny_dir, tmp_path):  # noqa: F811
    from qatune.model.hf_io import from_pretrained as gpt2_from_pretrained

    llama = from_pretrained(hf_dirs("llama"))
    with pytest.raises(ValueError, match=r"lora.targets \['attn.c_attn'\] are not Llama-family matrices"):
        apply_lora(llama, LoRAConfig(targets=["attn.c_attn"]))
    gpt2 = gpt2_from_pretrained(hf_tiny_dir)
    with pytest.raises(ValueError, match=r"lora.targets \['q_proj'\] are not GPT-2 matrices"):
        apply_lora(gpt2, LoRAConfig(targets=["q_proj"]))
    # a GPT-2 adapter (fan_in_fan_out: Conv1D) offered to a Llama model: refused by its config
    cfg = LoRAConfig(r=2)
    apply_lora(gpt2, cfg)
    save_adapter(gpt2, tmp_path / "gpt2", cfg)
    with pytest.raises(ValueError, match=r"adapter_config.json: fan_in_fan_out=True, but Llama-family weights"):
        load_adapter(from_pretrained(hf_dirs("llama")), tmp_path / "gpt2")


def test_export_merges_an_adapter_peft_trained_into_its_base(hf_dirs, tmp_path, capsys):  # noqa: F811
    """`qatune export BASE OUT --adapter DIR`: the merged folder gives peft's adapted logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qatune.cli import main

    folder = hf_dirs("llama")
    torch.manual_seed(1)
    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], init_lora_weights=False)
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), peft_cfg).eval()
    hf.save_pretrained(tmp_path / "adapter")
    assert main(["export", str(folder), str(tmp_path / "merged"), "--adapter", str(tmp_path / "adapter")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'merged'} (")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        adapted = hf(IDS).logits
        assert not torch.allclose(adapted, AutoModelForCausalLM.from_pretrained(folder)(IDS).logits)
        torch.testing.assert_close(merged(IDS).logits, adapted, rtol=0, atol=1e-5)
    assert main(["export", str(folder), str(tmp_path / "bad"), "--adapter", str(tmp_path / "nothing")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_adapter_gradients_equal_pefts(hf_dirs, tmp_path):  # noqa: F811
    """One training step's view: the chunked response loss through qatune's adapters gives peft's
    gradients for every lora_A and lora_B (fp32), with activation checkpointing on."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qatune.kernels.loss import response_loss_sum

    folder = hf_dirs("qwen2")
    ours = from_pretrained(folder).train()
    cfg = LoRAConfig(r=4, alpha=8)
    apply_lora(ours, cfg)
    make_nonzero(ours)
    save_adapter(ours, tmp_path / "adapter", cfg)
    base = AutoModelForCausalLM.from_pretrained(folder)
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True).train()
    targets = ids_of((2, 20), seed=5)
    ours.activation_checkpointing = True
    loss, count = response_loss_sum(ours(IDS), ours.head_weight, targets)
    (loss / count).backward()
    ref = F.cross_entropy(theirs(IDS).logits.flatten(0, 1), targets.flatten())
    ref.backward()
    torch.testing.assert_close(loss / count, ref, rtol=1e-5, atol=1e-6)
    grads = {
        k.removeprefix("base_model.model.model.").replace(".default", ""): p.grad
        for k, p in theirs.named_parameters()
        if p.requires_grad
    }
    ours_grads = {n: p.grad for n, p in adapter_state_dict(ours).items()}
    assert grads.keys() == ours_grads.keys()
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
