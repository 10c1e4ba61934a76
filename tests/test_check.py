"""`qatune check` on every shipped config (made CPU-quick: a tiny random model, local data) passes,
and a config broken on purpose fails, naming the check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatune.cli import main
from qatune.config import load_config
from qatune.methods.config import TrainConfig

pytestmark = pytest.mark.slow

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
# qatune check covers supervised fine-tuning; a preference config is refused by name (below).
SFT_CONFIGS = [c for c in CONFIGS if load_config(TrainConfig, c).method == "sft"]
TINY = ["model.init=random", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_positions=256"]


def quick(data: Path, tokenizer_dir: Path, tmp_path: Path) -> list[str]:
    """CPU-quick overrides: a tiny random GPT-2, the shared samples, one thread."""
    return [
        *TINY,
        f"data.sources=[{data}]",
        "data.max_len=256",
        f"tokenizer={tokenizer_dir}",
        f"out_dir={tmp_path / 'runs'}",
        "threads=1",
        "device=cpu",
        "compile=false",
    ]


@pytest.mark.parametrize("config", SFT_CONFIGS, ids=[c.stem for c in SFT_CONFIGS])
def test_every_shipped_config_passes(config, data_dir, tokenizer_dir, tmp_path, capsys):
    # t0 for the raw-template config, self-instruct (instruction + input + output) for the alpaca ones
    data = data_dir / ("t0_qa_subset" if config.stem == "tiny-cpu" else "self_instruct_seed")
    rc = main(["check", str(config), *quick(data, tokenizer_dir, tmp_path), "--sample", "12"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out
    for name in ("mask audit", "packed = unpacked", "accumulation", "save / resume", "export", "chat template"):
        assert f"{name}" in out
    assert "all 8 checks passed" in out and "loss tokens" in out
    # the round trip's three inner runs do not repeat their data report (it printed three times)
    assert captured.err.count("data: ") == 0


def test_a_method_it_does_not_check_is_one_line_exit_2(tokenizer_dir, tmp_path, capsys):
    config = Path(__file__).parents[1] / "configs" / "gpt2-dpo.yaml"
    rc = main(["check", str(config), *quick(tmp_path, tokenizer_dir, tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "method 'dpo' is not checked yet" in err and err.count("\n") == 1


def test_a_template_whose_prompt_leaks_into_the_loss_fails_the_mask_audit(data_dir, tokenizer_dir, tmp_path, capsys):
    leak = tmp_path / "leak.yaml"
    # The answer cue written as the response's prefix: "Answer:" becomes text the model is trained to write.
    leak.write_text(
        'name: leak\ndata:\n  template: {name: leaky, prompt: "Question: {prompt}\\n", response_prefix: "Answer: "}\n'
    )
    overrides = quick(data_dir / "gsm8k" / "test.jsonl", tokenizer_dir, tmp_path)
    rc = main(["check", str(leak), *overrides, "--sample", "12"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL mask audit: 12 of 12 records put other text in the loss" in out
    assert ": the loss reads 'Answer: " in out and "failed: mask audit" in out


def test_a_raw_template_whose_history_merges_across_answers_fails_the_chat_template_check(
    tokenizer_dir, tmp_path, capsys
):
    """`raw` puts an answer right after the user's text: "Count to 3" + "45" is " 345" as one string
    (what transformers tokenizes) but " 3", "45" segment by segment (what training feeds)."""
    data = tmp_path / "count.jsonl"
    turns = lambda i: [
        {"role": "user", "content": f"Count to {i}"},
        {"role": "assistant", "content": f"{i + 1}{i + 2}"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "done"},
    ]
    data.write_text("".join(json.dumps({"messages": turns(i)}) + "\n" for i in range(1, 13)))
    cfg = tmp_path / "raw.yaml"
    cfg.write_text("name: raw\ndata:\n  template: raw\n")
    rc = main(["check", str(cfg), *quick(data, tokenizer_dir, tmp_path), "--sample", "12"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "failed: chat template" in out and "tokenize differently through apply_chat_template" in out
    # The first record's prompt parts where " 1" + "23" became " 123".
    assert f"e.g. {data}:1, token 2: training has 352 ' 1', apply_chat_template has 17031 ' 123'" in out
