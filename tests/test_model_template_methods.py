"""GRPO, PPO, DPO and the reward model with the model's own chat template (`data.template: model`),
through `qatune train` as the docs print it.

Online methods: the rollout prompts are apply_chat_template(history, add_generation_prompt=True)'s
ids, and a response stops at the template's end-of-turn token (`<|im_end|>`), which it includes, as
a response includes EOS. The policy is tests/test_model_template_generation.py's tiny GPT-2 with the
packaged Qwen2.5 tokenizer, whose greedy answer is "Yes" then `<|im_end|>` forever (its EOS,
`<|endoftext|>`, never comes), sampled at a low temperature so that the rollout is that answer.

Pairs: prompt + chosen / rejected are apply_chat_template([user, assistant]) token for token, the
scored tokens the assistant span with its `<|im_end|>` (SFT's mask); DPO's first loss is log 2.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from tests.chat_templates import hf_ids, qwen_cache, qwen_folder, with_template  # noqa: F401  (fixtures)
from tests.test_model_template_generation import QUESTION, yes_then_end

import qatune.methods.online.method as online_mod
from qatune.cli import main
from qatune.model.hf_io import export_hf
from qatune.model.tokenizer import load_tokenizer
from qatune.train.metrics import read_metrics

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(qwen_folder):  # noqa: F811
    return load_tokenizer(qwen_folder)


@pytest.fixture(scope="module")
def qwen_dir(qwen_folder):  # noqa: F811
    """The packaged Qwen2.5 tokenizer's folder (ChatML template)."""
    return qwen_folder


@pytest.fixture(scope="module")
def policy_dir(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("yes_policy")
    export_hf(yes_then_end(tok), folder, tok)
    return folder


def write_config(tmp_path, method: str, model, tokenizer, sources: list[str], **settings):
    config = {
        "name": method,
        "out_dir": str(tmp_path / "runs"),
        "method": method,
        "tokenizer": str(tokenizer),
        "model": {"name": str(model)},
        "data": {"sources": sources, "template": "model", "max_len": 128},
        "max_steps": 1,
        "threads": 1,
        **settings,
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def chat_ids(tok, messages: list[dict], **kw) -> list[int]:
    return hf_ids(tok.apply_chat_template(messages, tokenize=True, **kw))


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_rollouts_prompt_with_the_chat_template_and_stop_at_im_end(
    method, tok, policy_dir, qwen_dir, tmp_path, monkeypatch
):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": QUESTION, "answer": "Yes"}) + "\n" for _ in range(4)))
    rollouts = []
    real = online_mod.sample_rollout

    def record(policy, prompts, stop, *args, **kw):
        out = real(policy, prompts, stop, *args, **kw)
        rollouts.append((stop, out))
        return out

    monkeypatch.setattr(online_mod, "sample_rollout", record)
    rl = {"prompts_per_rollout": 2, "group_size": 2, "reward": "exact_match"}
    rl["rollout"] = {"max_new_tokens": 6, "temperature": 0.05}
    config = write_config(tmp_path, method, policy_dir, qwen_dir, [str(qa)], rl=rl, eval={"fraction": 0.25})
    assert main(["train", str(config)]) == 0
    end = tok.convert_tokens_to_ids(END)
    expected = chat_ids(tok, [{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    stop, first = rollouts[0]
    assert list(stop) == [tok.eos_token_id, end]
    assert first.prompt_ids == [expected] * len(first.prompt_ids)
    # the answer and the <|im_end|> that ended it, as a response ends with its EOS; not 6 tokens
    assert first.response_ids == [[tok.convert_tokens_to_ids("Yes"), end]] * len(first.prompt_ids)
    assert first.stopped_at_eos == [True] * len(first.prompt_ids)
    assert first.mask.tolist() == [[True, True]] * len(first.prompt_ids)
    [step] = [r for r in read_metrics(tmp_path / "runs" / method) if "loss" in r]
    assert step["reward"] == 1.0 and step["eos_rate"] == 1.0 and step["response_length"] == 2.0


PAIRS = [  # two layouts (one per file): explicit, and TRL's conversational with a system message
    {"prompt": QUESTION, "chosen": "Yes, it is.", "rejected": "No."},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is fire hot?"}],
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "It is cold.<|endoftext|>"}],
    },
]


def write_pairs(folder, copies: int) -> list[str]:
    paths = [folder / f"pairs{i}.jsonl" for i in range(len(PAIRS))]
    for path, pair in zip(paths, PAIRS):
        path.write_text((json.dumps(pair) + "\n") * copies)
    return [str(p) for p in paths]


def test_pairs_are_the_chat_templates_conversations_up_to_im_end(tok, qwen_dir, tmp_path):
    from qatune.data.pipeline import DataConfig
    from qatune.data.preference.batching import collate_pairs
    from qatune.data.preference.pipeline import load_pairs

    sources = write_pairs(tmp_path, 1)
    loaded = load_pairs(DataConfig(sources=sources, template="model", max_len=128), tok)
    histories = [[{"role": "user", "content": QUESTION}], PAIRS[1]["prompt"]]
    answers = [("Yes, it is.", "No."), ("Yes.", "It is cold.")]  # a literal end-of-text is not the answer's
    end = tok.convert_tokens_to_ids(END)
    assert len(loaded.pairs) == 2
    for pair, history, (chosen, rejected) in zip(loaded.pairs, histories, answers):
        assert pair.prompt_ids == chat_ids(tok, history, add_generation_prompt=True)
        for response, text in ((pair.chosen_ids, chosen), (pair.rejected_ids, rejected)):
            whole = chat_ids(tok, [*history, {"role": "assistant", "content": text}])
            assert tok.decode(whole[-2:]) == END + "\n"  # ChatML's newline after the turn: left out
            assert pair.prompt_ids + response == whole[:-1] and response[-1] == end
            assert tok.decode(response) == text + END
    # the reward model scores each sequence at its <|im_end|> (as transformers does, pad = EOS)
    batch = collate_pairs(loaded.pairs, [0, 1], tok.eos_token_id, 256, tok.eos_token_id)
    assert batch.input_ids.flatten()[batch.last_token].tolist() == [end] * 4


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_pair_methods_train_with_the_chat_template(method, tok, policy_dir, qwen_dir, tmp_path):
    """DPO's first loss is log 2 (reference = the initial weights, dropout off); the reward model's
    first loss is -log sigmoid of the score difference at the two <|im_end|> tokens."""
    config = write_config(
        tmp_path,
        method,
        policy_dir,
        qwen_dir,
        write_pairs(tmp_path, 4),
        eval={"fraction": 0.25},
        save_every=1,
        max_steps=2,
    )
    assert main(["train", str(config)]) == 0
    first = next(r for r in read_metrics(tmp_path / "runs" / method) if "loss" in r)
    assert math.isfinite(first["loss"])
    if method == "dpo":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    saved = json.loads((tmp_path / "runs" / method / "export" / "qatune.json").read_text())
    assert saved["template"]["name"] == "model" and saved["template"]["chat_template"] == tok.chat_template
    if method != "dpo":  # `qatune export` of a checkpoint writes a causal LM, not a reward model
        return
    # `qatune export` of a training checkpoint saves the template bound to the tokenizer, as the run's export
    from qatune.train.checkpoints import latest_checkpoint

    checkpoint = latest_checkpoint(tmp_path / "runs" / method / "checkpoints")
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "qatune.json").read_text())
    unbound = {"source"}  # where the tokenizer was read from differs; the template itself not
    assert {k: v for k, v in exported["template"].items() if k not in unbound} == {
        k: v for k, v in saved["template"].items() if k not in unbound
    }


def test_a_prompt_whose_end_merges_into_the_answer_is_an_error_naming_the_record(qwen_dir, tmp_path):
    """A generation prompt ending in a space gives the space to the answer's first token (" Yes"):
    the conversation does not start with the prompt's ids, so no split of the two is right."""
    from qatune.data.pipeline import DataConfig
    from qatune.data.preference.pipeline import load_pairs
    from qatune.data.records import DataError

    spaced = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = load_tokenizer(with_template(qwen_dir, tmp_path / "tok", spaced))
    [source, _] = write_pairs(tmp_path, 1)
    with pytest.raises(DataError, match=r"pairs0\.jsonl:1: the chat template's conversation does not start with"):
        load_pairs(DataConfig(sources=[source], template="model", max_len=128), tok)
