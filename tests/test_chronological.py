"""boneage_jax.chronological: ages as people write them, ages from dates, RDES14's fields."""

from __future__ import annotations

import datetime

import pytest

from boneage_jax import chronological


@pytest.mark.parametrize("text, months", [
    ("114", 114.0), ("100.5", 100.5), ("114m", 114.0), (" 9y6m ", 114.0), ("9y 6m", 114.0), ("9Y6M", 114.0),
    ("9y", 108.0), ("9.5y", 114.0), ("0", 0.0), ("20y", 240.0), ("6m", 6.0),
])
def test_parse_age(text, months):
    assert chronological.parse_age(text) == pytest.approx(months)


@pytest.mark.parametrize("text", ["", "ten", "9y6", "y", "m", "-3", "241", "21y", "nan", "inf", "9m6y", "9 years"])
def test_parse_age_names_the_flag_and_what_was_expected(text):
    with pytest.raises(ValueError) as e:
        chronological.parse_age(text, "--age")
    assert str(e.value).startswith(f"--age {text!r}: expected months (114 or 114m) or years and months")
    assert "from 0 to 240 months" in str(e.value)


def test_age_between_dates():
    birth, exam = datetime.date(2015, 3, 2), datetime.date(2024, 9, 2)
    assert chronological.age_between(birth, exam) == pytest.approx(114.0, abs=0.1)  # 9 years 6 months (3,472 days)
    assert chronological.age_between(birth, birth) == 0.0
    with pytest.raises(ValueError, match="exam date 2015-03-01 is before the birth date 2015-03-02"):
        chronological.age_between(birth, datetime.date(2015, 3, 1))
    with pytest.raises(ValueError, match="is 241 months; at most 240"):
        chronological.age_between(birth, datetime.date(2035, 4, 2))
    assert chronological.parse_date(" 2024-09-02", "--exam_date") == exam
    with pytest.raises(ValueError, match=r"^--birth_date '2.3.2015': expected a date as YYYY-MM-DD$"):
        chronological.parse_date("2.3.2015", "--birth_date")


def test_compare_gives_rdes14_fields_without_inventing_a_standard_deviation():
    fields = chronological.compare(120.25, 114.0)
    assert fields == {"chronological_age_months": 114.0, "skeletal_age_months": 120.25, "difference_months": 6.25,
                      "standard_deviation_for_age_months": None, "sds": None, "determination": "unknown",
                      "note": chronological.NO_REFERENCE}
    assert "no published table" in fields["note"]


def test_resolve_takes_an_age_or_both_dates_and_names_the_field():
    assert chronological.resolve("9y6m", None, None) == 114.0
    assert chronological.resolve(None, "2015-03-02", "2024-09-02") == pytest.approx(114.0, abs=0.1)
    assert chronological.resolve(None, None, None) is None and chronological.resolve("", " ", None) is None
    names = ("age_months", "birth_date", "exam_date")
    for args, message in [
        (("114", None, "2024-09-02"), "give age_months or birth_date with exam_date, not both"),
        ((None, "2015-03-02", None), "birth_date and exam_date go together: give both, or age_months"),
        ((None, "2015-03-02", "2024/09/02"), "exam_date '2024/09/02': expected a date as YYYY-MM-DD"),
        (("ten", None, None), "age_months 'ten': expected months"),
    ]:
        with pytest.raises(ValueError) as e:
            chronological.resolve(*args, names=names)
        assert str(e.value).startswith(message), args
