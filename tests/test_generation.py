"""KV-cache generation equals no-cache generation and transformers' greedy generate."""

from __future__ import annotations

import torch

from qatune.generation.sampling import SamplingConfig, filter_logits, generate_ids
from qatune.model.hf_io import from_pretrained

EOS = 50256


def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 50000, (n,), generator=g).tolist() for n in (5, 9, 2)]


def test_cache_equals_no_cache_greedy(hf_tiny_dir):
    model = from_pretrained(hf_tiny_dir)
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eos=False)
    with_cache = generate_ids(model, prompts(), EOS, cfg, use_cache=True)
    without = generate_ids(model, prompts(), EOS, cfg, use_cache=False)
    assert [g.ids for g in with_cache] == [g.ids for g in without]
    assert all(len(g.ids) == 12 for g in with_cache)


def test_batched_left_padded_equals_transformers_generate_one_by_one(hf_tiny_dir):
    from transformers import GPT2LMHeadModel

    ref = GPT2LMHeadModel.from_pretrained(hf_tiny_dir).eval()
    model = from_pretrained(hf_tiny_dir)
    batched = generate_ids(model, prompts(), EOS, SamplingConfig(max_new_tokens=10, stop_at_eos=False))
    for p, g in zip(prompts(), batched):
        out = ref.generate(
            torch.tensor([p]),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=EOS,
            eos_token_id=None,
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
        )
        assert out[0, len(p) :].tolist() == g.ids


def test_stops_at_eos_and_reports_it(tiny_model):
    # Make EOS the argmax everywhere by giving its embedding row a huge norm along every hidden state.
    with torch.no_grad():
        tiny_model.wte.weight[EOS] = 0
        tiny_model.ln_f.bias.fill_(1.0)
        tiny_model.ln_f.weight.zero_()
        tiny_model.wte.weight[EOS] = 100.0
    out = generate_ids(tiny_model, [[1, 2, 3], [4]], EOS, SamplingConfig(max_new_tokens=5))
    assert [g.ids for g in out] == [[], []] and all(g.stopped_at_eos for g in out)


def test_sampling_is_seeded(hf_tiny_dir):
    model = from_pretrained(hf_tiny_dir)
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_at_eos=False)
    a = generate_ids(model, prompts(), EOS, cfg)
    b = generate_ids(model, prompts(), EOS, cfg)
    assert [g.ids for g in a] == [g.ids for g in b]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone < 0.7, 0.5+0.3 >= 0.7 -> keep the first two
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [[False, True, True, True]]


def test_generate_cli_names_a_generation_length_the_context_cannot_hold(hf_tiny_dir, tokenizer_dir, capsys):
    from qatune.cli import main

    args = ["generate", str(hf_tiny_dir), "--prompt", "Hi", "--tokenizer", str(tokenizer_dir)]
    assert main([*args, "--max-new-tokens", "128"]) == 2  # the tiny model's context is 128
    assert "max_new_tokens=128 leaves no prompt room in the model's 128-token context" in capsys.readouterr().err
    assert main([*args, "--max-new-tokens", "3", "--no-stop-at-eos"]) == 0
    assert capsys.readouterr().out.startswith("Hi")


def test_sampling_draws_from_the_distribution():
    from qatune.generation.sampling import sample_from

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]]).expand(20000, 5)  # zero-probability tokens never come up
    drawn = sample_from(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=5) / 20000
    assert counts[0] == 0 and counts[2] == 0
    torch.testing.assert_close(counts, torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2]), atol=0.015, rtol=0)
