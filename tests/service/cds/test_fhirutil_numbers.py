"""is_number: the cheap check extraction makes before a value is converted must agree with to_decimal."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from service.cds.fhirutil import is_number, to_decimal

json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.from_regex(r"-?\d{1,6}(\.\d{1,4})?", fullmatch=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@given(json_values)
def test_is_number_agrees_with_to_decimal(value: object) -> None:
    assert is_number(value) == (to_decimal(value) is not None)


def test_examples() -> None:
    assert is_number(9) and is_number(9.4) and is_number("9.4") and is_number(Decimal("1.5"))
    assert not is_number(True) and not is_number(float("inf")) and not is_number(float("nan")) and not is_number("nine")
    assert not is_number(None) and not is_number([1])
    assert is_number(999_999_999_999) and not is_number(10**12) and not is_number(1e200) and not is_number("-1e200")
