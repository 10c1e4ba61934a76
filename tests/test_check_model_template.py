"""`qatune check` with `data.template=model` on a tokenizer folder with its own chat template
(Qwen2.5's ChatML, the converted qwen2.5 tokenizer): the mask audit reads each answer + `<|im_end|>`,
and the chat template check compares training's ids with apply_chat_template through the export,
PASS, or FAIL naming the record and the first differing token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.chat_templates import CHATML_MARKED, LLAMA3_TEMPLATE, qwen_cache, qwen_folder, with_template  # noqa: F401
from tests.test_check import TINY

from qatune.check import CheckReport, check_chat_template, load_sample
from qatune.cli import main
from qatune.config import load_config
from qatune.data.templates import bind_template
from qatune.methods.config import TrainConfig
from qatune.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow


def conversations(path: Path) -> Path:
    """Multi-turn conversations, some with a system message."""
    lines = []
    for i in range(6):
        messages = [{"role": "system", "content": "Trả lời ngắn gọn."}] if i % 2 else []
        messages += [
            {"role": "user", "content": f"Đếm tới {i + 2}."},
            {"role": "assistant", "content": " ".join(str(k) for k in range(1, i + 3))},
            {"role": "user", "content": "Cảm ơn!"},
            {"role": "assistant", "content": "Không có gì."},
        ]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config(tmp_path: Path, sources: list[Path], tokenizer: Path) -> tuple[Path, list[str]]:
    cfg = tmp_path / "own.yaml"
    cfg.write_text("name: own\n")
    overrides = [
        "data.template=model",  # as docs/check.md runs it
        *TINY[:-1],
        "model.n_positions=512",
        f"data.sources=[{','.join(map(str, sources))}]",
        "data.max_len=512",
        f"tokenizer={tokenizer}",
        f"out_dir={tmp_path / 'runs'}",
        "threads=1",
        "device=cpu",
        "compile=false",
    ]
    return cfg, overrides


def test_check_on_the_models_own_template_passes_token_for_token(qwen_folder, data_dir, tmp_path, capsys):  # noqa: F811
    data = [conversations(tmp_path / "chats.jsonl"), data_dir / "xquad_vi" / "train.jsonl"]  # 6 + 2 records
    cfg, overrides = config(tmp_path, data, qwen_folder)
    rc = main(["check", str(cfg), *overrides, "--sample", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "the loss is exactly each answer + <|im_end|>" in out
    assert "apply_chat_template == training's ids, whole conversations and generation prompts" in out
    assert "<|im_start|>assistant" in out and "all 8 checks passed" in out


def test_an_export_whose_template_renders_otherwise_fails_naming_the_first_differing_token(qwen_folder, tmp_path):  # noqa: F811
    """The comparison itself: against a folder whose chat template is Llama 3's, the first
    conversation parts at token 0 (Qwen's `<|im_start|>` against Llama's BOS text)."""
    cfg, overrides = config(tmp_path, [conversations(tmp_path / "chats.jsonl")], qwen_folder)
    cfg = load_config(TrainConfig, cfg, overrides)
    tokenizer = load_tokenizer(qwen_folder)
    sample, _ = load_sample(cfg, tokenizer, 4)
    other = with_template(qwen_folder, tmp_path / "other", LLAMA3_TEMPLATE)
    report = CheckReport()
    check_chat_template(report, other, sample, bind_template(cfg.data.get_template(), tokenizer), tokenizer)
    result = report.results[0]
    assert result.status == "FAIL"
    where = f"{tmp_path / 'chats.jsonl'}:1"
    assert result.detail == (
        f"4 of 4 records differ from apply_chat_template, e.g. {where}: the conversation, "
        "token 0: training has 151644 '<|im_start|>', apply_chat_template has 27 '<'"
    )


def test_a_tokenizer_with_its_own_template_trained_with_qatunes_gets_a_note(qwen_folder, tokenizer_dir):  # noqa: F811
    from qatune.check import own_template_note
    from qatune.data.templates import get_template

    qwen = load_tokenizer(qwen_folder)
    assert own_template_note(get_template("chat"), qwen) == [
        "note: the tokenizer has its own chat template; data.template=model trains with it (now: chat)"
    ]
    assert own_template_note(bind_template(get_template("model"), qwen), qwen) == []
    assert own_template_note(get_template("chat"), load_tokenizer(tokenizer_dir)) == []  # GPT-2 has none


def check_on(template_text: str, qwen_folder: Path, tmp_path: Path):  # noqa: F811
    """The chat template check, a folder with `template_text` as both the training tokenizer and the export."""
    folder = with_template(qwen_folder, tmp_path / "tok", template_text)
    cfg, overrides = config(tmp_path, [conversations(tmp_path / "chats.jsonl")], folder)
    cfg = load_config(TrainConfig, cfg, overrides)
    tokenizer = load_tokenizer(folder)
    sample, _ = load_sample(cfg, tokenizer, 4)
    report = CheckReport()
    check_chat_template(report, folder, sample, cfg.data.get_template(tokenizer), tokenizer)
    return report.results[0]


def test_a_template_with_generation_markers_has_its_mask_compared_too(qwen_folder, tmp_path):  # noqa: F811
    result = check_on(CHATML_MARKED, qwen_folder, tmp_path)
    assert result.status == "PASS", result.detail
    assert result.detail.endswith("generation prompts; the assistant mask = the loss tokens")


def test_a_generation_prompt_ending_in_a_space_fails_where_the_answer_took_the_space(qwen_folder, tmp_path):  # noqa: F811
    """ "A: " + "Không có gì." renders "A: Không …": tokenized whole, the space belongs to " Không",
    so training's prompt ends at "A:" while apply_chat_template's generation prompt "A: " ends in
    a lone " " token the model never saw before an answer."""
    spaced = (
        "{%- for m in messages %}{%- if m.role == 'assistant' %}{{- 'A: ' + m.content + '<|im_end|>\\n' }}"
        "{%- else %}{{- 'Q: ' + m.content + '\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'A: ' }}{%- endif %}"
    )
    result = check_on(spaced, qwen_folder, tmp_path)
    assert result.status == "FAIL"
    assert result.detail == (
        f"4 of 4 records differ from apply_chat_template, e.g. {tmp_path / 'chats.jsonl'}:1: the generation prompt, "
        "token 25: training has nothing (it ends), apply_chat_template has 220 ' '"
    )
