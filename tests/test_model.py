"""Our GPT-2 against transformers' on the same weights; packing; strict loading; export."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from qatune.model.gpt2 import GPT2
from qatune.model.hf_io import CheckpointError, export_hf, from_pretrained


def hf_model(folder):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder).eval()


def test_logits_match_transformers(hf_tiny_dir):
    ours = from_pretrained(hf_tiny_dir).eval()
    ref = hf_model(hf_tiny_dir)
    torch.manual_seed(0)
    ids = torch.randint(0, 50257, (3, 17))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours.lm_head(ours(ids))
    # fp32 forward, O(1) values: rounding ~1e-7 (measured <= 2e-8 on AVX-512/AVX2/plain kernels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_logits_match_transformers_with_left_padding(hf_tiny_dir):
    ours = from_pretrained(hf_tiny_dir).eval()
    ref = hf_model(hf_tiny_dir)
    torch.manual_seed(0)
    ids = torch.randint(0, 50257, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding of 5 and 2
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=positions).logits
        got = ours.lm_head(ours(ids, position_ids=positions, attention_mask=mask))
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)  # as above: measured <= 2e-8
    # And a padded row equals the same prompt run alone, unpadded.
    with torch.no_grad():
        alone = ours.lm_head(ours(ids[0:1, 5:]))
    torch.testing.assert_close(got[0, 5:], alone[0], atol=1e-5, rtol=1e-5)  # as above: measured <= 2e-8


def test_packed_rows_equal_separate_documents(tiny_model):
    model = tiny_model.eval()
    torch.manual_seed(0)
    a, b, c = torch.randint(0, 50257, (7,)), torch.randint(0, 50257, (5,)), torch.randint(0, 50257, (9,))
    ids = torch.cat([a, b, c])[None]
    doc_ids = torch.tensor([0] * 7 + [1] * 5 + [2] * 9)[None]
    positions = torch.cat([torch.arange(7), torch.arange(5), torch.arange(9)])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=positions, doc_ids=doc_ids)[0]
        separate = torch.cat([model(x[None])[0] for x in (a, b, c)])
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)  # fp32 forward, O(1) values: rounding ~1e-7


def test_activation_checkpointing_gives_same_gradients(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(0, 50257, (2, 16))
    model = tiny_model.train()

    def grads(ckpt: bool):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        model.lm_head(model(ids)).float().logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for g1, g2 in zip(grads(False), grads(True)):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)  # the same ops recomputed: measured bit-equal


def test_export_roundtrip_loads_in_transformers_without_warnings(hf_tiny_dir, tmp_path, gpt2_tokenizer):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    ours = from_pretrained(hf_tiny_dir).eval()
    out = export_hf(ours, tmp_path / "export", gpt2_tokenizer)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    hf_logging.set_verbosity_warning()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 50257, (2, 11))
    with torch.no_grad():
        # fp32 forward, O(1) values: rounding ~1e-7 (measured <= 1.1e-8 on AVX-512/AVX2/plain kernels)
        torch.testing.assert_close(ours.lm_head(ours(ids)), ref.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    # and back in again, bit for bit
    again = from_pretrained(out)
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_pytorch_model_bin_is_read_with_weights_only(hf_tiny_dir, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((hf_tiny_dir / "config.json").read_text())
    torch.save(load_file(str(hf_tiny_dir / "model.safetensors")), folder / "pytorch_model.bin")
    a, b = from_pretrained(folder), from_pretrained(hf_tiny_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _broken_copy(src, dst, mutate):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    mutate(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_strict_load_names_a_renamed_key(hf_tiny_dir, tmp_path):
    def rename(sd):
        sd["transformer.h.1.mlp.c_fc.weightX"] = sd.pop("transformer.h.1.mlp.c_fc.weight")

    folder = _broken_copy(hf_tiny_dir, tmp_path / "renamed", rename)
    with pytest.raises(CheckpointError, match=r"missing keys: h\.1\.mlp\.c_fc\.weight") as e:
        from_pretrained(folder)
    assert "transformer.h.1.mlp.c_fc.weightX" in str(e.value)


def test_strict_load_names_a_wrong_shape(hf_tiny_dir, tmp_path):
    def reshape(sd):
        sd["transformer.h.0.attn.c_proj.weight"] = torch.zeros(64, 65)

    folder = _broken_copy(hf_tiny_dir, tmp_path / "shape", reshape)
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_proj\.weight.*\(64, 65\)"):
        from_pretrained(folder)


def test_non_gpt2_config_is_refused(hf_tiny_dir, tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    cfg = json.loads((hf_tiny_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type"):
        from_pretrained(folder)


def test_position_beyond_context_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="exceeds the context"):
        tiny_model(torch.zeros(1, 129, dtype=torch.long))


def test_random_init_statistics():
    torch.manual_seed(0)
    from qatune.model.gpt2 import GPT2Config

    m = GPT2(GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=64))
    assert abs(m.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(m.h[0].mlp.c_proj.weight.std().item() - 0.02 / (2 * 4) ** 0.5) < 0.001
    assert m.h[0].ln_1.weight.eq(1).all() and m.h[0].attn.c_attn.bias.eq(0).all()
