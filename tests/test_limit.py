"""Tests for the ``Limit`` value object: construction, parsing, bounds and error messages."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_ratelimit import ConfigError, InvalidLimit, Limit, RateLimitError
from queue_ratelimit._limit import MAX_LIMIT_TEXT

# text, rate, per (seconds), burst (default), tokens per second
VALID = [
    ("100/s", 100, 1, 100, 100),
    ("6000/m", 6000, 60, 6000, 100),
    ("10/h", 10, 3600, 10, 10 / 3600),
    ("5/2s", 5, 2, 5, 2.5),
    ("1/d", 1, 86400, 1, 1 / 86400),
    ("100/1.5s", 100, 1.5, 100, 100 / 1.5),
    ("2/ms", 2, 0.001, 2, 2000),
    ("0.5/s", 0.5, 1, 1, 0.5),  # burst is at least one token
    (".5/s", 0.5, 1, 1, 0.5),
    ("1e3/s", 1000, 1, 1000, 1000),
    ("3/10min", 3, 600, 3, 3 / 600),
    ("7/hour", 7, 3600, 7, 7 / 3600),
    ("7/hours", 7, 3600, 7, 7 / 3600),
    ("4/sec", 4, 1, 4, 4),
    ("4/seconds", 4, 1, 4, 4),
    ("4/minute", 4, 60, 4, 4 / 60),
    ("2/days", 2, 86400, 2, 2 / 86400),
    ("  12 / 3 h  ", 12, 10800, 12, 12 / 10800),
    ("100/S", 100, 1, 100, 100),
    ("1000000000/s", 1e9, 1, 1e9, 1e9),  # the maximum rate is accepted
]


@pytest.mark.parametrize(("text", "rate", "per", "burst", "per_second"), VALID)
def test_parse_valid(text: str, rate: float, per: float, burst: float, per_second: float) -> None:
    limit = Limit.parse(text)
    assert limit.rate == pytest.approx(rate)
    assert limit.per == pytest.approx(per)
    assert limit.burst == pytest.approx(burst)
    assert limit.capacity == pytest.approx(burst)
    assert limit.rate_per_second == pytest.approx(per_second)
    assert isinstance(limit.rate, float)
    assert isinstance(limit.per, float)
    assert isinstance(limit.burst, float)


def test_parse_takes_an_explicit_burst() -> None:
    assert Limit.parse("6000/m", burst=200) == Limit(6000, per=60, burst=200)
    assert Limit.parse("6000/m", burst=200).rate_per_second == 100


def test_parse_equals_constructor() -> None:
    assert Limit.parse("100/s") == Limit(100)
    assert Limit.parse("5/2s") == Limit(5, per=2, burst=5)
    assert hash(Limit.parse("10/h")) == hash(Limit(10, per=3600))


@pytest.mark.parametrize(
    ("limit", "burst"),
    [
        (Limit(100), 100),
        (Limit(5, per=2), 5),
        (Limit(0.25), 1),
        (Limit(1, per=3600), 1),
        (Limit(50, burst=100), 100),
        (Limit(50, burst=1), 1),
        (Limit(50, burst=2.5), 2.5),
    ],
)
def test_default_and_explicit_burst(limit: Limit, burst: float) -> None:
    assert limit.burst == burst


def test_limit_is_immutable_and_has_a_readable_str() -> None:
    limit = Limit(100, burst=20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limit.rate = 5  # type: ignore[misc]
    assert str(limit) == "100/1s burst 20"
    assert repr(Limit(100)) == "Limit(rate=100.0, per=1.0, burst=100.0)"


# text, a fragment the message must contain
INVALID_TEXT = [
    ("", "cannot parse limit ''"),
    ("100", "expected '<rate>/<unit>'"),
    ("100/", "cannot parse"),
    ("/s", "cannot parse"),
    ("abc/s", "cannot parse"),
    ("100/s/s", "cannot parse"),
    ("100 per second", "cannot parse"),
    ("-1/s", "cannot parse"),
    ("nan/s", "cannot parse"),
    ("inf/s", "cannot parse"),
    ("100/fortnight", "unknown time unit 'fortnight'"),
    ("100/y", "unknown time unit 'y'"),
    ("100/us", "unknown time unit 'us'"),
    ("0/s", "greater than 0"),
    ("100/0s", "per must be a finite number greater than 0"),
    ("1e12/s", "above the maximum"),
    ("2e9/s", "above the maximum"),
    ("1/400d", "per must be 0.001 to"),
    ("1e-9/s", "below the minimum"),
    ("1/1000000000s", "per must be 0.001 to"),
]


@pytest.mark.parametrize(("text", "fragment"), INVALID_TEXT)
def test_parse_invalid(text: str, fragment: str) -> None:
    with pytest.raises(InvalidLimit) as info:
        Limit.parse(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize("value", [100, 1.5, None, b"100/s", ["100/s"]])
def test_parse_rejects_non_strings(value: object) -> None:
    with pytest.raises(InvalidLimit, match="must be a string like '100/s'"):
        Limit.parse(value)  # type: ignore[arg-type]


def test_parse_rejects_a_bad_burst() -> None:
    with pytest.raises(InvalidLimit, match="burst must be at least 1 token"):
        Limit.parse("100/s", burst=0.5)


# keyword arguments, a fragment the message must contain
INVALID_ARGS = [
    ({"rate": 0}, "rate must be a finite number greater than 0, got 0"),
    ({"rate": -1}, "rate must be a finite number greater than 0"),
    ({"rate": math.nan}, "rate must be a finite number greater than 0, got nan"),
    ({"rate": math.inf}, "rate must be a finite number greater than 0, got inf"),
    ({"rate": -math.inf}, "rate must be a finite number"),
    ({"rate": True}, "rate must be a number, got True"),
    ({"rate": "100"}, "rate must be a number, got '100'"),
    ({"rate": None}, "rate must be a number, got None"),
    ({"rate": 1e10}, "above the maximum"),
    ({"rate": 1e300}, "above the maximum"),
    ({"rate": 1e-8}, "below the minimum"),
    ({"rate": 1, "per": 0}, "per must be a finite number greater than 0"),
    ({"rate": 1, "per": -5}, "per must be a finite number greater than 0"),
    ({"rate": 1, "per": math.nan}, "per must be a finite number"),
    ({"rate": 1, "per": math.inf}, "per must be a finite number"),
    ({"rate": 1, "per": False}, "per must be a number"),
    ({"rate": 1, "per": 367 * 86400}, "per must be 0.001 to"),
    ({"rate": 100, "per": 1e-9}, "per must be 0.001 to"),
    # A tiny rate over a tiny period is an ordinary rate per second, carried in few bits.
    ({"rate": 5e-324, "per": 5e-324}, "per must be 0.001 to"),
    ({"rate": 1e-300, "per": 1e-305}, "per must be 0.001 to"),
    ({"rate": 1e-300}, "below the minimum"),
    ({"rate": 1, "burst": 2**53 + 1}, "burst must be at most"),
    ({"rate": 1, "burst": 0}, "burst must be a finite number greater than 0"),
    ({"rate": 1, "burst": -1}, "burst must be a finite number greater than 0"),
    ({"rate": 1, "burst": 0.5}, "burst must be at least 1 token, got 0.5"),
    ({"rate": 1, "burst": 0.999}, "burst must be at least 1 token"),
    ({"rate": 1, "burst": math.nan}, "burst must be a finite number"),
    ({"rate": 1, "burst": math.inf}, "burst must be a finite number"),
    ({"rate": 1, "burst": True}, "burst must be a number, got True"),
    ({"rate": 1, "burst": "10"}, "burst must be a number"),
    ({"rate": 1, "burst": 1e13}, "burst must be at most"),
]


@pytest.mark.parametrize(("kwargs", "fragment"), INVALID_ARGS)
def test_construction_invalid(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidLimit) as info:
        Limit(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_invalid_limit_is_a_config_error_and_a_value_error() -> None:
    with pytest.raises(InvalidLimit) as info:
        Limit(0)
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, RateLimitError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 1e9},  # the highest rate
        {"rate": 1, "per": 1e7},  # the lowest rate, 1e-7 per second
        {"rate": 10, "per": 366 * 86400},  # the longest period
        {"rate": 1, "burst": 1},  # the smallest burst
        {"rate": 1, "burst": 1e12},  # the largest burst
    ],
)
def test_bounds_are_inclusive(kwargs: dict[str, float]) -> None:
    Limit(**kwargs)  # type: ignore[arg-type]


# The pattern Limit.parse used before it split the text first (#11 finding 6): kept here
# as the reference for what the text syntax accepts.
_OLD_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_OLD_LIMIT_RE = re.compile(
    rf"^\s*(?P<rate>{_OLD_NUMBER})\s*/\s*(?P<count>{_OLD_NUMBER})?\s*(?P<unit>[a-zA-Z]+)\s*$"
)


def _old_parse(text: str) -> Limit | str:
    match = _OLD_LIMIT_RE.match(text)
    if match is None:
        return "invalid"
    unit = match["unit"].lower()
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "h": 3600, "d": 86400, "min": 60}
    if unit not in units:
        return "invalid"
    count = float(match["count"]) if match["count"] else 1.0
    try:
        return Limit(float(match["rate"]), per=count * units[unit])
    except InvalidLimit:
        return "invalid"


@given(st.text(alphabet="0123456789.eE+-/ \tsmhdinc!", max_size=24))
@settings(max_examples=500, deadline=None)
def test_parse_accepts_what_the_old_pattern_accepted(text: str) -> None:
    expected = _old_parse(text)
    try:
        got: Limit | str = Limit.parse(text)
    except InvalidLimit:
        got = "invalid"
    assert got == expected, text


@pytest.mark.parametrize(
    "text",
    [
        # Backtracking bait: the old pattern's time grew with the square of this length
        # (70 s at 50,000 each), and its error echoed all of it.
        "1/" + " " * 2000 + "s" * 2000 + " !",
        "1/" + " " * 50000 + "s" * 50000 + " !",
        "1" * 100_000 + "/s",
        "1/s" + " " * 100_000,
    ],
)
def test_hostile_text_is_refused_at_once_with_a_short_message(text: str) -> None:
    with pytest.raises(InvalidLimit) as info:
        Limit.parse(text)
    message = str(info.value)
    assert f"at most {MAX_LIMIT_TEXT} characters" in message
    assert len(message) < 300
    assert f"({len(text)} characters)" in message


def test_the_longest_sensible_limit_fits() -> None:
    text = " 1000000000.000 / 1.00000000000000e+00 seconds "
    assert len(text) <= MAX_LIMIT_TEXT
    assert Limit.parse(text) == Limit(1e9)
