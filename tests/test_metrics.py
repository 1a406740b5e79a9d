"""The matching rule (toolkit.evaluation.terms) and the three local evaluate metrics, on hand-made answers."""

from __future__ import annotations

import unicodedata

import pytest

from toolkit.evaluation import terms
from toolkit.evaluation.scoring import load_metrics


@pytest.fixture(scope="module")
def metrics():
    return load_metrics()


@pytest.mark.parametrize(
    "text, term",
    [
        ("철근콘크리트 구조입니다.", "철근 콘크리트"),  # spacing differs
        ("철근 콘크리트 구조입니다.", "철근콘크리트"),
        ("철근\t콘크리트\n구조", "철근 콘크리트"),
        ("ＲＣ조 건물", "RC조"),  # full-width Latin
        ("LoRA 어댑터", "lora"),  # Latin case
        ("양생 중 온도 습도 관리", "온도·습도"),  # middle dot vs space
        ("양생 중 온도ㆍ습도 관리", "온도 습도"),  # araea used as a middle dot
        ("양생 중 온도-습도 관리", "온도·습도"),  # hyphen vs middle dot
        (unicodedata.normalize("NFD", "거푸집을 떼어 낸다"), "거푸집"),  # decomposed Hangul
        ("ㄱㅏ", "가"),  # compatibility jamo
        ("면적 10㎡", "10 m2"),
    ],
)
def test_a_term_is_found_whatever_the_spacing_and_unicode_variant(text, term):
    assert terms.split_terms(text, [term]) == ([term], [])


@pytest.mark.parametrize("text, term", [("철근 공사", "철근콘크리트"), ("콘크리트", "철근"), ("온도 관리", "습도")])
def test_a_term_that_is_not_there_is_missing(text, term):
    assert terms.split_terms(text, [term]) == ([], [term])


def test_split_terms_keeps_order():
    found, missing = terms.split_terms("거푸집과 동바리를 설치한다", ["비계", "거푸집", "동바리", "철근"])
    assert found == ["거푸집", "동바리"]
    assert missing == ["비계", "철근"]


def test_key_terms_prefer_row_terms_then_glossary_then_none():
    glossary = ["콘크리트", "철근 콘크리트", "비계"]
    row = {"instruction": "설명", "output": "철근콘크리트는 튼튼하다.", "terms": ["철근"]}
    assert terms.key_terms(row, glossary) == ["철근"]
    no_terms = {"instruction": "설명", "output": "철근콘크리트는 튼튼하다."}
    assert terms.key_terms(no_terms, glossary) == ["콘크리트", "철근 콘크리트"]
    assert terms.key_terms(no_terms, None) is None
    assert terms.key_terms({**no_terms, "output": "무관한 문장"}, glossary) == []


def test_term_accuracy_is_the_share_of_rows_with_every_term(metrics):
    predictions = ["철근콘크리트와 거푸집", "철근 콘크리트만", "ＲＣ", "아무것도 없음"]
    references = [["철근 콘크리트", "거푸집"], ["철근콘크리트", "거푸집"], ["rc"], ["비계"]]
    assert metrics["term_accuracy"].compute(predictions=predictions, references=references) == {"term_accuracy": 0.5}


def test_term_recall_pools_terms_over_rows(metrics):
    predictions = ["철근콘크리트와 거푸집", "철근 콘크리트만", "ＲＣ", "아무것도 없음"]
    references = [["철근 콘크리트", "거푸집"], ["철근콘크리트", "거푸집"], ["rc"], ["비계"]]
    result = metrics["term_recall"].compute(predictions=predictions, references=references)
    assert result == {"term_recall": pytest.approx(4 / 6)}


def test_rows_without_terms_are_left_out_of_term_metrics(metrics):
    predictions = ["거푸집", "아무 말", "비계"]
    references = [["거푸집"], [], ["동바리"]]
    assert metrics["term_accuracy"].compute(predictions=predictions, references=references)["term_accuracy"] == 0.5
    assert metrics["term_recall"].compute(predictions=predictions, references=references)["term_recall"] == 0.5


def test_no_terms_anywhere_is_not_available_not_zero(metrics):
    predictions, references = ["거푸집", "비계"], [[], []]
    assert metrics["term_accuracy"].compute(predictions=predictions, references=references) == {"term_accuracy": None}
    assert metrics["term_recall"].compute(predictions=predictions, references=references) == {"term_recall": None}


def test_exact_match_normalises_unicode_space_and_punctuation(metrics):
    predictions = ["철근 콘크리트 입니다", "ＲＣ 구조.", "Lo-RA", "거푸집"]
    references = ["철근콘크리트입니다.", "rc구조", "lora", "동바리"]
    assert metrics["exact_match"].compute(predictions=predictions, references=references) == {"exact_match": 0.75}
