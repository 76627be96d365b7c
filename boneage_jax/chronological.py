"""Bone age against chronological age, in the fields of the ACR/RSNA common data element RDES14.

:func:`parse_age` reads a chronological age as people write it (``114`` or ``114m`` months,
``9y6m``, ``9y``, ``9.5y``); :func:`age_between` computes it from a birth date and an exam date;
:func:`resolve` takes either, as ``predict``'s flags and the service's fields give them;
:func:`compare` gives what ``predict`` and the web service report beside the bone age:

- ``chronological_age_months``, ``skeletal_age_months`` (the predicted bone age) and
  ``difference_months`` (skeletal minus chronological);
- ``standard_deviation_for_age_months``, ``sds`` and ``determination`` (delayed / normal /
  advanced beyond +-2 SD in RDES14): these need a published table of bone-age standard deviations
  by age and sex (Greulich and Pyle's, or another citable source), which this codebase does not
  have. They are null and ``determination`` is RDES14's ``unknown``, with ``note`` saying why.
  Nothing is extrapolated or guessed in their place.
"""

from __future__ import annotations

import datetime
import math
import re

MAX_AGE_MONTHS = 240.0  # the chronological ages accepted (the RSNA data span 1-228 months)
DAYS_PER_MONTH = 365.25 / 12.0
NO_REFERENCE = ("no standard deviation score or delayed/normal/advanced: this codebase has no published table "
                "of bone-age standard deviations by age and sex")

_YEARS_MONTHS = re.compile(r"^(?:(\d+(?:\.\d+)?)\s*y)?\s*(?:(\d+(?:\.\d+)?)\s*m)?$")


def parse_age(text: str, name: str = "--age") -> float:
    """A chronological age in months from ``114``, ``114m``, ``9y6m``, ``9y 6m``, ``9y`` or
    ``9.5y``; ValueError naming ``name`` and what was expected otherwise, or outside 0-240 months."""
    expected = (f"{name} {text!r}: expected months (114 or 114m) or years and months (9y6m, 9y, 9.5y), "
                f"from 0 to {MAX_AGE_MONTHS:g} months")
    value = text.strip().lower()
    try:
        months = float(value)
    except ValueError:
        match = _YEARS_MONTHS.match(value)
        if not value or match is None or not any(match.groups()):
            raise ValueError(expected) from None
        years, extra = (float(g) if g else 0.0 for g in match.groups())
        months = 12.0 * years + extra
    if not math.isfinite(months) or not 0.0 <= months <= MAX_AGE_MONTHS:
        raise ValueError(expected)
    return months


def parse_date(text: str, name: str) -> datetime.date:
    """An ISO date (YYYY-MM-DD); ValueError naming ``name`` otherwise."""
    try:
        return datetime.date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{name} {text!r}: expected a date as YYYY-MM-DD") from None


def age_between(birth: datetime.date, exam: datetime.date) -> float:
    """Months from ``birth`` to ``exam`` (days over 365.25 / 12); ValueError if the exam comes
    first or the age is over 240 months."""
    if exam < birth:
        raise ValueError(f"the exam date {exam.isoformat()} is before the birth date {birth.isoformat()}")
    months = (exam - birth).days / DAYS_PER_MONTH
    if months > MAX_AGE_MONTHS:
        raise ValueError(f"the age from {birth.isoformat()} to {exam.isoformat()} is {months:.0f} months; at most "
                         f"{MAX_AGE_MONTHS:g}")
    return months


def resolve(age: str | None, birth_date: str | None, exam_date: str | None,
            names: tuple[str, str, str] = ("--age", "--birth_date", "--exam_date")) -> float | None:
    """The chronological age in months that ``age`` or ``birth_date`` with ``exam_date`` give
    (None without them; empty strings count as not given); ValueError naming the flag or field
    (``names``) for a bad, doubly given or half-given age."""
    age, birth_date, exam_date = ((v if v is not None and v.strip() else None) for v in (age, birth_date, exam_date))
    age_name, birth_name, exam_name = names
    if age is not None and (birth_date is not None or exam_date is not None):
        raise ValueError(f"give {age_name} or {birth_name} with {exam_name}, not both")
    if age is not None:
        return parse_age(age, age_name)
    if (birth_date is None) != (exam_date is None):
        raise ValueError(f"{birth_name} and {exam_name} go together: give both, or {age_name}")
    if birth_date is None:
        return None
    return age_between(parse_date(birth_date, birth_name), parse_date(exam_date, exam_name))


def compare(skeletal_age_months: float, chronological_age_months: float) -> dict:
    """RDES14's fields for a bone age read against a chronological age (see the module docstring)."""
    return {
        "chronological_age_months": float(chronological_age_months),
        "skeletal_age_months": float(skeletal_age_months),
        "difference_months": float(skeletal_age_months - chronological_age_months),
        "standard_deviation_for_age_months": None,
        "sds": None,
        "determination": "unknown",
        "note": NO_REFERENCE,
    }
