"""Answer metrics against hand-computed values, including Vietnamese text and empty answers."""

from __future__ import annotations

import unicodedata

import pytest

from qatune.generation.metrics import (
    exact_match,
    lcs_length,
    normalize_answer,
    rouge_l,
    summarize,
    summarize_by_source,
    token_f1,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat's  hat!", "cats hat"),  # SQuAD: punctuation deleted (not spaced), articles dropped
        ("  An apple, a pear and THE end. ", "apple pear and end"),
        ("theory anthem", "theory anthem"),  # articles only as whole words
        ("“Hello,” she said… ¿Qué? «Xin chào»", "hello she said qué xin chào"),  # Unicode punctuation
        ("5 + 3 = 8", "5 3 8"),  # SQuAD's ASCII set includes + and =
        ("10 € × 2 🙂", "10 € × 2 🙂"),  # non-ASCII symbols carry meaning: kept
        ("Thành phố Hồ Chí Minh.", "thành phố hồ chí minh"),
        ("ĐÀ NẴNG", "đà nẵng"),
        ("", ""),
        ("a an the ...", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize_answer(text) == expected


def test_vietnamese_diacritics_survive_and_forms_are_unified():
    composed = "Hà Nội là thủ đô"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert exact_match(decomposed, composed) == 1.0
    assert exact_match("Ha Noi la thu do", composed) == 0.0  # the tones are part of the word
    assert token_f1("Ha Noi la thu do", composed) == 0.0


def test_exact_match():
    assert exact_match("The answer is 42.", "answer is 42") == 1.0
    assert exact_match("42", "forty-two") == 0.0


def test_token_f1_hand_computed():
    # pred tokens [cat, sat, on, mat], ref [cat, on, mat]: overlap 3, P = 3/4, R = 1 -> F1 = 6/7
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # repeated tokens count once per occurrence: pred [x, x, y], ref [x, y, y]: overlap 2 -> 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0


def test_rouge_l_hand_computed():
    # [police, killed, gunman] vs [police, kill, gunman]: LCS 2, P = R = 2/3
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(2 / 3)
    # order matters for ROUGE-L, not for F1: LCS of [gunman, police, killed] and [police, killed, gunman] is 2
    assert rouge_l("gunman police killed", "police killed gunman") == pytest.approx(2 / 3)
    assert token_f1("gunman police killed", "police killed gunman") == 1.0
    # [a b c d e] vs [a c e]: LCS 3, P = 3/5, R = 1 -> F = 2*(3/5)/(8/5) = 3/4
    assert rouge_l("x1 x2 x3 x4 x5", "x1 x3 x5") == pytest.approx(0.75)


def test_vietnamese_word_order():
    pred, ref = "Hà Nội là thủ đô.", "Thủ đô là Hà Nội"
    assert exact_match(pred, ref) == 0.0
    assert token_f1(pred, ref) == 1.0  # same bag of words
    # LCS of [hà nội là thủ đô] and [thủ đô là hà nội] is 2 ("hà nội" or "thủ đô"): F = 2/5
    assert rouge_l(pred, ref) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("", "", 1.0),  # both empty: a match (SQuAD convention)
        ("The.", "", 1.0),  # normalizes to empty
        ("", "yes", 0.0),
        ("yes", "", 0.0),
    ],
)
def test_empty_answers(pred, ref, expected):
    assert exact_match(pred, ref) == expected
    assert token_f1(pred, ref) == expected
    assert rouge_l(pred, ref) == expected


def test_lcs_length():
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (CLRS)


def record(source, em, f1, rl, gen, ref, eos):
    return {
        "source": source,
        "exact_match": em,
        "f1": f1,
        "rouge_l": rl,
        "generated_tokens": gen,
        "reference_tokens": ref,
        "stopped_at_eos": eos,
    }


def test_summaries():
    records = [
        record("a", 1.0, 1.0, 1.0, 2, 2, True),
        record("a", 0.0, 0.5, 0.25, 10, 4, False),
        record("b", 1.0, 1.0, 1.0, 3, 3, True),
        record("b", 0.0, 0.0, 0.0, 1, 5, True),
    ]
    s = summarize(records)
    assert s == {
        "n": 4,
        "exact_match": 0.5,
        "f1": 2.5 / 4,
        "rouge_l": 2.25 / 4,
        "answer_tokens": 4.0,
        "reference_tokens": 3.5,
        "stopped_at_eos": 0.75,
        "no_eos": 1,
    }
    by = summarize_by_source(records)
    assert list(by) == ["a", "b"]
    assert by["a"]["exact_match"] == 0.5 and by["a"]["no_eos"] == 1 and by["a"]["answer_tokens"] == 6.0
    assert by["b"]["f1"] == 0.5 and by["b"]["stopped_at_eos"] == 1.0
    assert summarize([])["n"] == 0
