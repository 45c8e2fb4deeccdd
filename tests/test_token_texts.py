"""The stored form of a bucket's tokens (lua/buckets.lua, ``tokens_text``), in the library's
own Lua 5.1 (lupa): whole numbers as they always were, positive fractions rounded *down* to a
grid of 1e-9 tokens (1e-6 from 9e6 tokens, 1e-3 from 9e9) and printed as a whole count of
steps with its exponent, anything else in full. Whatever reads a bucket (Lua's ``+ 0`` and
``tonumber``, which every version of the scripts uses, and Python's ``float``) must read the
text as the very double the code goes on with, never above the tokens it had."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_lean import library_function

TWO_53 = 2.0**53

# (tokens, text stored): the edges of each grid, the bursts the limits allow (at most 1e12,
# and 1e12 of credit), and products t * scale that round up to the next whole step.
CASES = [
    (5.0, "5"),
    (0.0, "0"),
    (1e12, "1000000000000"),
    (0.5, "500000000e-9"),
    (1 / 3, "333333333e-9"),
    # 0.3 * 1e9 rounds up to 300000000, which reads back as 0.3 itself: kept.
    (0.3, "300000000e-9"),
    (2.7000000000000002 - 1, "1700000000e-9"),
    (1e-12, "0e-9"),  # less than one step
    (1 / (115 * 86400), "100e-9"),  # a token every 115 days, a second's worth
    (8999999.875, "8999999875000000e-9"),
    (9000000.5, "9000000500000e-6"),
    (8999999999.75, "8999999999750000e-6"),
    (9e9 + 0.25, "9000000000250e-3"),
    (9007199254.740992, "9007199254740e-3"),  # 2^53 millionths
    (999999999999.75, "999999999999750e-3"),
    (1999999999999.5, "1999999999999500e-3"),  # burst and credit at their bounds
    # The product rounds up to a step the text would read back above the tokens: one less.
    (1797086.3454948459, "1797086345494845e-9"),
    (4960769592.3751955, "4960769592375195e-6"),
    (688568549218.7369, "688568549218736e-3"),
    # Beyond any valid burst, and below zero (the tolerance of judge): in full.
    (9e12 + 0.5, "9000000000000.5"),
    (-5e-10, "-5.0000000000000003e-10"),
    (-0.0, "-0"),
]


@pytest.fixture(scope="module")
def lua() -> tuple[Any, Any]:
    runtime, tokens_text = library_function("tokens_text")
    # (What every reader in Lua does with a stored number: buckets.lua reads `text + 0`.)
    read = runtime.eval("function(text) return text + 0, tonumber(text) end")
    return tokens_text, read


def step_of(t: float) -> float:
    return 1e-9 if t < 9e6 else 1e-6 if t < 9e9 else 1e-3


def check(lua: tuple[Any, Any], t: float) -> str:
    """The text stored for ``t``, after checking what every reader reads it as."""
    tokens_text, read = lua
    text, value = tokens_text(t)
    coerced, parsed = read(text)
    assert coerced == parsed == float(text) == value, text  # one double, for every reader
    if t % 1 == 0 or not 0 < t < 9e12:
        assert value == t or (t == 0 and value == 0)  # (printed in full)
        return str(text)
    assert re.fullmatch(r"\d+e-[963]", text), text
    steps, exponent = text.split("e-")
    assert 10.0 ** -int(exponent) == step_of(t)
    assert int(steps) < TWO_53  # a whole double: printed and divided exactly
    assert value <= t, "never more than the bucket had"
    # (Less than a step in decimal; the double read back may sit half a unit below that.)
    assert t - value < step_of(t) + math.ulp(t), "less than one step kept back"
    return str(text)


@pytest.mark.parametrize(("tokens", "text"), CASES, ids=[c[1] for c in CASES])
def test_tokens_are_stored_at_the_edges_as_tabled(
    lua: tuple[Any, Any], tokens: float, text: str
) -> None:
    assert check(lua, tokens) == text


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.floats(min_value=0, max_value=2e13, allow_nan=False),
        st.floats(min_value=0, max_value=10, allow_nan=False),
        st.floats(min_value=8.9e6, max_value=9.1e6),
        st.floats(min_value=8.9e9, max_value=9.1e9),
        st.integers(0, 2**53).map(lambda n: n / 1e9),
    )
)
def test_every_positive_number_reads_back_at_most_one_step_below(
    lua: tuple[Any, Any], tokens: float
) -> None:
    check(lua, tokens)
