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

import pytest
import yaml
from tests.chat_templates import hf_ids, qwen_cache, qwen_folder  # noqa: F401  (fixtures)
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


def write_config(tmp_path, method: str, model, tokenizer, source, **settings):
    config = {
        "name": method,
        "out_dir": str(tmp_path / "runs"),
        "method": method,
        "tokenizer": str(tokenizer),
        "model": {"name": str(model)},
        "data": {"sources": [str(source)], "template": "model", "max_len": 128},
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
    config = write_config(tmp_path, method, policy_dir, qwen_dir, qa, rl=rl, eval={"fraction": 0.25})
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
