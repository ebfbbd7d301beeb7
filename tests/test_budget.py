"""Budget parsing and accounting (lpcompile.budget)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lpcompile.budget import BYTE_UNITS, Budget, format_up, parse_budget
from lpcompile.errors import BudgetError, LpError


@pytest.mark.parametrize(
    ("text", "kind", "value", "shown"),
    [
        ("4.5bits", "bits", 4.5, "4.5 bits"),
        ("4.5 bits", "bits", 4.5, "4.5 bits"),
        ("4.5", "bits", 4.5, "4.5 bits"),
        ("  4.5  ", "bits", 4.5, "4.5 bits"),
        ("4.5bpw", "bits", 4.5, "4.5 bits"),
        ("4.5 BITS", "bits", 4.5, "4.5 bits"),
        ("1bit", "bits", 1.0, "1 bits"),
        (".5", "bits", 0.5, "0.5 bits"),
        ("4.", "bits", 4.0, "4 bits"),
        ("45e-1", "bits", 4.5, "4.5 bits"),
        ("12MB", "bytes", 12e6, "12 MB"),
        ("12 MB", "bytes", 12e6, "12 MB"),
        ("12MiB", "bytes", 12 * 2**20, "12 MiB"),
        ("500KB", "bytes", 500e3, "500 KB"),
        ("500kB", "bytes", 500e3, "500 kB"),
        ("3KiB", "bytes", 3 * 1024, "3 KiB"),
        ("1.5GB", "bytes", 1.5e9, "1.5 GB"),
        ("2GiB", "bytes", 2 * 2**30, "2 GiB"),
        ("1TB", "bytes", 1e12, "1 TB"),
        ("1024B", "bytes", 1024.0, "1024 B"),
    ],
)
def test_parse_budget_accepts(text: str, kind: str, value: float, shown: str) -> None:
    b = parse_budget(text)
    assert b.kind == kind
    assert b.value == pytest.approx(value, rel=1e-15)
    assert str(b) == shown
    assert parse_budget(str(b)) == b  # str round-trips


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "bits",
        "4.5b",  # ambiguous: bits or bytes
        "12mb",  # lower-case b: megabits by convention, rejected
        "12Mb",
        "12MIB",
        "4.5 bytes",
        "4.5xbits",
        "0",
        "0bits",
        "0MB",
        "-1",
        "-4.5bits",
        "+0",
        "nan",
        "NaN bits",
        "inf",
        "-inf",
        "1e400",
        "1e400MB",
        "4,5",
        "4.5.1",
        "0x10",
        "1_000B",
        "4.5 bits bits",
        "MB12",
    ],
)
def test_parse_budget_rejects(text: str) -> None:
    with pytest.raises(BudgetError) as info:
        parse_budget(text)
    msg = str(info.value)
    assert msg and "\n" not in msg
    assert isinstance(info.value, LpError)


def test_parse_budget_messages_are_specific() -> None:
    with pytest.raises(BudgetError, match="ambiguous"):
        parse_budget("4.5b")
    with pytest.raises(BudgetError, match="positive"):
        parse_budget("-3")
    with pytest.raises(BudgetError, match="unknown budget unit 'mb'"):
        parse_budget("12mb")
    with pytest.raises(BudgetError, match="finite"):
        parse_budget("1e999")


def test_parse_budget_rejects_non_string() -> None:
    with pytest.raises(BudgetError):
        parse_budget(4.5)  # type: ignore[arg-type]


def test_max_total_bits() -> None:
    assert parse_budget("4.5").max_total_bits(1000) == 4500.0
    assert parse_budget("12MB").max_total_bits(1000) == 12e6 * 8
    assert parse_budget("1KiB").max_total_bits(7) == 8192.0
    assert Budget.bytes(2, "MiB") == parse_budget("2MiB")
    assert Budget.bits(3) == parse_budget("3bits")


@pytest.mark.parametrize(
    ("kind", "value", "unit"),
    [
        ("bits", 0.0, ""),
        ("bits", -1.0, ""),
        ("bits", math.nan, ""),
        ("bytes", math.inf, ""),
        ("words", 1.0, ""),
        ("bits", 4.0, "MB"),
        ("bytes", 4.0, "mb"),
        ("bits", "x", ""),
    ],
)
def test_budget_validates(kind: str, value: float, unit: str) -> None:
    with pytest.raises(BudgetError):
        Budget(kind, value, unit)  # type: ignore[arg-type]


def test_describe_total_rounds_up_in_the_budget_unit() -> None:
    assert parse_budget("3").describe_total(4.125 * 1000, 1000) == "4.125 bits"
    assert parse_budget("1MB").describe_total(8 * 1.5e6, 123) == "1.5 MB"
    assert parse_budget("1MiB").describe_total(8 * 2**20, 123) == "1 MiB"
    text = parse_budget("1").describe_total(1000.0, 3)  # 333.333... bits per weight
    assert float(text.split()[0]) >= 1000 / 3


@given(st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False))
def test_format_up_is_an_upper_bound(x: float) -> None:
    s = format_up(x)
    assert float(s) >= x
    assert float(s) <= x * (1 + 1e-5)


@given(
    st.floats(min_value=1e-6, max_value=1e12, allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "bits", " bits", "bpw", *BYTE_UNITS]),
)
def test_parse_budget_any_positive_number(x: float, unit: str) -> None:
    b = parse_budget(f"{x!r}{unit}")
    expected = x * BYTE_UNITS[unit] if unit in BYTE_UNITS else x
    assert b.kind == ("bytes" if unit in BYTE_UNITS else "bits")
    assert b.value == pytest.approx(expected, rel=1e-15)
    assert b.display_value == pytest.approx(x, rel=1e-12)
