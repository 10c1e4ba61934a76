"""Answer metrics: exact match and token F1 (SQuAD-style), ROUGE-L, and their aggregation.

Normalization follows the SQuAD v1.1 evaluation script — lowercase, delete punctuation, delete the
English articles a/an/the, collapse whitespace — made Unicode-aware:
- text is put in NFC first, so a precomposed "ệ" and "e" + combining marks compare equal, and
  Vietnamese diacritics survive (combining marks are letters' parts, never deleted);
- lowercasing is Python's Unicode `str.lower` ("Đ" -> "đ");
- deleted as punctuation: SQuAD's ASCII set (`string.punctuation`, which includes symbols such as
  `$ + < = > ^ | ~`) plus every character of a Unicode punctuation category (P*: “ ” « » ¿ 。 ，
  … —). Other symbols (€, ×, emoji) carry meaning and are kept;
- whitespace is any Unicode whitespace.

Empty answers follow SQuAD too: two empty normalized answers match (EM = F1 = ROUGE-L = 1), one
empty and one not score 0.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

ASCII_PUNCTUATION = frozenset(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punctuation(ch: str) -> bool:
    return ch in ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(ch for ch in text if not _is_punctuation(ch))
    text = ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) over the normalized tokens: 2PR/(P+R) with P = LCS/|pred|, R = LCS/|ref|."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, reference: str | Sequence[str]) -> dict[str, float]:
    """The per-record metrics stored in a generations file. With several accepted answers each
    metric takes its best over them, as the SQuAD evaluation script does."""
    references = [reference] if isinstance(reference, str) else list(reference)
    return {
        "exact_match": max(exact_match(prediction, r) for r in references),
        "f1": max(token_f1(prediction, r) for r in references),
        "rouge_l": max(rouge_l(prediction, r) for r in references),
    }


def summarize(records: Iterable[dict]) -> dict:
    """Means over generation records (as written to the generations file): exact match, F1,
    ROUGE-L, generated and reference answer length in tokens, and how many stopped at EOS."""
    records = list(records)
    n = len(records)
    mean = lambda key: sum(r[key] for r in records) / n if n else 0.0
    stopped = sum(1 for r in records if r["stopped_at_eos"])
    return {
        "n": n,
        "exact_match": mean("exact_match"),
        "f1": mean("f1"),
        "rouge_l": mean("rouge_l"),
        "answer_tokens": mean("generated_tokens"),
        "reference_tokens": mean("reference_tokens"),
        "stopped_at_eos": stopped / n if n else 0.0,
        "no_eos": n - stopped,
    }


def summarize_by_source(records: Iterable[dict]) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["source"], []).append(r)
    return {source: summarize(rs) for source, rs in sorted(groups.items())}
