"""Continuous batching: sequences that join and leave a running batch generate what they would
alone; seeded sampling, EOS, stop strings, cancellation and the queue bound."""

from __future__ import annotations

import random

import pytest
import torch

from qatune.generation.continuous import ContinuousBatcher, QueueFull, Sequence
from qatune.generation.sampling import SamplingConfig, generate_ids
from qatune.generation.textstream import TextStream, held_back
from qatune.model.hf_io import from_pretrained


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny matmuls gain nothing from more, and lose a lot on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(hf_tiny_dir):
    return from_pretrained(hf_tiny_dir)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_seq(p, cfg, stops=(), outputs=None):
    out = [] if outputs is None else outputs
    return Sequence(p, cfg, out.append, stops), out


def run_until_idle(batcher, max_steps=1000):
    for _ in range(max_steps):
        if not batcher.running and not batcher.waiting:
            return
        batcher.step()
    raise AssertionError("batcher did not finish")


def test_staggered_sequences_generate_what_they_would_alone(model, gpt2_tokenizer, monkeypatch):
    """Short and long prompts join a running batch at different steps (a 60-token prompt joins
    when the shared pointer is at 21: spans move right; later the pointer reaches the cache end:
    spans move left), rows leave in the middle; every sequence's tokens equal generate_ids alone."""
    batcher = ContinuousBatcher(model, gpt2_tokenizer, max_batch=3)
    shifts = []
    move = batcher._move
    monkeypatch.setattr(batcher, "_move", lambda shift: (shifts.append(shift), move(shift)))
    plan = [(0, 5, 100), (0, 12, 30), (20, 60, 60), (25, 3, 90), (40, 30, 50), (41, 8, 20), (90, 17, 100)]
    seqs = {}
    for step in range(400):
        for i, (at, plen, new) in enumerate(plan):
            if at == step:
                seqs[i] = make_seq(prompt(plen, i), SamplingConfig(max_new_tokens=new, stop_at_eos=False))
                batcher.submit([seqs[i][0]])
        batcher.step()
    assert not batcher.running and not batcher.waiting
    assert min(shifts) < 0 < max(shifts) and batcher.stats["prefills"] == len(plan)
    for i, (_, _, new) in enumerate(plan):
        seq, outputs = seqs[i]
        [alone] = generate_ids(model, [seq.prompt], 50256, SamplingConfig(max_new_tokens=new, stop_at_eos=False))
        assert seq.tokens == alone.ids, f"sequence {i}"
        assert "".join(o.text for o in outputs) == gpt2_tokenizer.decode(alone.ids)
        assert [o.finish_reason for o in outputs][-1] == "length" and outputs[-1].tokens == new


def test_seeded_sampling_does_not_depend_on_the_batch(model, gpt2_tokenizer):
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=5, stop_at_eos=False)
    batcher = ContinuousBatcher(model, gpt2_tokenizer, max_batch=4)
    sampled, _ = make_seq(prompt(7, 1), cfg)
    others = [make_seq(prompt(4 + i, 10 + i), SamplingConfig(max_new_tokens=20))[0] for i in range(3)]
    batcher.submit([others[0], sampled, *others[1:]])
    run_until_idle(batcher)
    [alone] = generate_ids(model, [sampled.prompt], 50256, cfg)
    assert sampled.tokens == alone.ids


def test_eos_ends_a_sequence_and_is_counted(tiny_model, gpt2_tokenizer):
    with torch.no_grad():  # EOS becomes the argmax everywhere
        tiny_model.ln_f.weight.zero_()
        tiny_model.ln_f.bias.fill_(1.0)
        tiny_model.wte.weight[50256] = 100.0
    batcher = ContinuousBatcher(tiny_model, gpt2_tokenizer)
    seq, outputs = make_seq([1, 2, 3], SamplingConfig(max_new_tokens=5))
    batcher.submit([seq])
    run_until_idle(batcher)
    assert seq.tokens == [50256]
    assert [(o.text, o.tokens, o.finish_reason) for o in outputs] == [("", 1, "stop")]


def test_stop_string_cuts_the_text_and_frees_the_row(model, gpt2_tokenizer):
    cfg = SamplingConfig(max_new_tokens=30, stop_at_eos=False)
    [alone] = generate_ids(model, [prompt(6, 3)], 50256, cfg)
    full = gpt2_tokenizer.decode(alone.ids)
    stop = full[10:14]
    batcher = ContinuousBatcher(model, gpt2_tokenizer)
    seq, outputs = make_seq(prompt(6, 3), cfg, stops=("never appears", stop))
    batcher.submit([seq])
    run_until_idle(batcher)
    assert "".join(o.text for o in outputs) == full[: full.index(stop)]
    assert outputs[-1].finish_reason == "stop" and len(seq.tokens) < 30


def test_cancelled_sequence_leaves_and_emits_nothing_more(model, gpt2_tokenizer):
    batcher = ContinuousBatcher(model, gpt2_tokenizer, max_batch=2)
    keep, keep_out = make_seq(prompt(5, 1), SamplingConfig(max_new_tokens=40, stop_at_eos=False))
    gone, gone_out = make_seq(prompt(9, 2), SamplingConfig(max_new_tokens=40, stop_at_eos=False))
    batcher.submit([gone, keep])
    for _ in range(3):
        batcher.step()
    batcher.cancel(gone)
    n_out = len(gone_out)
    batcher.step()
    assert batcher.running == [keep]
    run_until_idle(batcher)
    assert len(gone_out) == n_out and len(gone.tokens) < 40
    [alone] = generate_ids(model, [keep.prompt], 50256, SamplingConfig(max_new_tokens=40, stop_at_eos=False))
    assert keep.tokens == alone.ids and keep_out[-1].finish_reason == "length"


def test_queue_bound_and_context_check(model, gpt2_tokenizer):
    batcher = ContinuousBatcher(model, gpt2_tokenizer, max_batch=1, max_waiting=2)
    cfg = SamplingConfig(max_new_tokens=4)
    batcher.submit([make_seq([1], cfg)[0], make_seq([2], cfg)[0]])
    with pytest.raises(QueueFull, match="2 sequences are waiting"):
        batcher.submit([make_seq([3], cfg)[0]])
    with pytest.raises(ValueError, match="does not fit the 128-token context"):
        batcher.submit([make_seq(prompt(100, 0), SamplingConfig(max_new_tokens=29))[0]])


def test_an_error_ends_the_sequences_in_flight_and_the_batcher_goes_on(model, gpt2_tokenizer, monkeypatch):
    batcher = ContinuousBatcher(model, gpt2_tokenizer)
    seq, outputs = make_seq(prompt(5, 0), SamplingConfig(max_new_tokens=10))
    batcher.submit([seq])
    with monkeypatch.context() as m:
        m.setattr(batcher, "_decode", lambda: 1 / 0)
        batcher.step()
    assert outputs[-1].finish_reason == "error" and "ZeroDivisionError" in outputs[-1].error
    again, again_out = make_seq(prompt(5, 0), SamplingConfig(max_new_tokens=10, stop_at_eos=False))
    batcher.submit([again])
    run_until_idle(batcher)
    assert again_out[-1].finish_reason == "length" and len(again.tokens) == 10


def test_text_stream_never_shows_half_a_character_or_a_stop(gpt2_tokenizer):
    text = "Tiếng Việt 🎉 naïve — ok. STOP here"
    ids = gpt2_tokenizer(text).input_ids
    stream = TextStream(gpt2_tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    stream = TextStream(gpt2_tokenizer, stops=("STOP",))
    pieces = [stream.push(t) for t in ids]
    assert stream.stopped and "".join(pieces) + stream.finish() == "Tiếng Việt 🎉 naïve — ok. "
    # random ids (not text the tokenizer would produce) still join to tokenizer.decode
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(50257) for _ in range(30)]
        stream = TextStream(gpt2_tokenizer)
        assert "".join([stream.push(t) for t in ids] + [stream.finish()]) == gpt2_tokenizer.decode(ids)


def test_held_back_is_the_longest_end_that_starts_a_stop():
    assert held_back("abc", ("cde",)) == 1
    assert held_back("abcd", ("cde", "bcdx")) == 3
    assert held_back("abc", ("xyz",)) == 0
    assert held_back("a", ("a",)) == 0  # a whole stop is found, not held
