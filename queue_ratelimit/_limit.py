"""The ``Limit`` value object: a rate, its period and a burst, validated once."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ._errors import InvalidLimit
from ._scopes import _shown

# Bounds chosen so that every valid limit round-trips through the Lua script's doubles
# with no loss that matters, and so that a typo ("1e12/s") is caught rather than obeyed.
MAX_RATE_PER_SECOND = 1e9
MIN_RATE_PER_SECOND = 1e-7  # about one token every 116 days
MAX_PERIOD_SECONDS = 366 * 86400.0
# A millisecond, the smallest unit parse knows: a tinier period (subnormal, even) would
# only carry a rate given as tiny as itself, in fewer bits.
MIN_PERIOD_SECONDS = 0.001
MAX_BURST = 1e12
# The most windows one scope's limit may have (100/s and 10000/d are two); lua/buckets.lua
# refuses more.
MAX_WINDOWS = 4
# The longest limit text accepted ("1000000000/366d" is 15 characters): parsing a longer one
# is refused before any pattern runs, so its cost is bounded whatever the input.
MAX_LIMIT_TEXT = 64

_UNITS = {
    "ms": 0.001,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}  # fmt: skip
_NUMBER = r"(?:\d++(?:\.\d*+)?+|\.\d++)(?:[eE][+-]?+\d++)?+"
# Each side of the "/" is matched on its own (split first), with possessive quantifiers
# only: no part can be re-split by backtracking, so a match is linear in the text. (One
# pattern over the whole text with optional parts between spaces took 70 s on 100 KB.)
_RATE_RE = re.compile(_NUMBER)
_PER_RE = re.compile(rf"(?P<count>{_NUMBER})?+\s*+(?P<unit>[a-zA-Z]++)")
# The portable form of a limit, as a JSON-schema pattern (the admin API's document): every
# text it matches is within the bounds above, so a client that checks against it is never
# refused. 999999/ms is 9.99999e8/s, 1/99d is 1.17e-7/s; parse also reads more (0.5/s,
# 1e3/m, 100/second, spaces).
_DOC_UNIT = "|".join(sorted(_UNITS, key=len, reverse=True))  # "seconds" before "s"
LIMIT_PATTERN = rf"^[1-9][0-9]{{0,5}}/([1-9][0-9]?)?({_DOC_UNIT})$"
_SYNTAX = "expected '<rate>/<unit>' or '<rate>/<n><unit>' such as '100/s', '6000/m' or '5/2s'"


def _finite_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidLimit(f"{name} must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number) or number <= 0:
        raise InvalidLimit(f"{name} must be a finite number greater than 0, got {_shown(value)}")
    return number


@dataclass(frozen=True, slots=True, repr=False)
class Limit:
    """``rate`` tokens every ``per`` seconds, with a bucket that holds ``burst`` tokens.

    ``burst`` defaults to the tokens of one period (at least 1), so ``Limit(100)`` admits
    100 jobs at once after a quiet spell and 100 per second after that.

    ``credit`` (burst credits, default none): while the bucket is full its refill keeps
    flowing into a bank of at most ``credit`` tokens, spent once the bucket is empty. A
    tenant quiet long enough gets ``burst + credit`` at once; over any interval ``T`` at
    most ``rate_per_second * T + burst + credit`` are admitted (docs/tuning.md).

    >>> Limit(100)
    Limit(rate=100.0, per=1.0, burst=100.0)
    >>> Limit.parse("6000/m", burst=200).rate_per_second
    100.0

    Raises:
        InvalidLimit: a value is not finite, is ``<= 0``, is absurdly large or small,
            ``burst`` is below 1, or ``credit`` is negative or above ``MAX_BURST``.
    """

    rate: float
    per: float = 1.0
    burst: float | None = None
    credit: float | None = None

    def __post_init__(self) -> None:
        rate = _finite_positive("rate", self.rate)
        per = _finite_positive("per", self.per)
        if not MIN_PERIOD_SECONDS <= per <= MAX_PERIOD_SECONDS:
            raise InvalidLimit(
                f"per must be {MIN_PERIOD_SECONDS:g} to {MAX_PERIOD_SECONDS:g} seconds, got {per:g}"
            )
        per_second = rate / per
        if per_second > MAX_RATE_PER_SECOND:
            raise InvalidLimit(
                f"rate {rate:g}/{per:g}s is {per_second:g} per second, above the maximum "
                f"{MAX_RATE_PER_SECOND:g}/s"
            )
        if per_second < MIN_RATE_PER_SECOND:
            raise InvalidLimit(
                f"rate {rate:g}/{per:g}s is {per_second:g} per second, below the minimum "
                f"{MIN_RATE_PER_SECOND:g}/s"
            )
        burst = max(1.0, rate) if self.burst is None else _finite_positive("burst", self.burst)
        if burst < 1:
            raise InvalidLimit(f"burst must be at least 1 token, got {burst:g}")
        if burst > MAX_BURST:
            raise InvalidLimit(f"burst must be at most {MAX_BURST:g}, got {burst:g}")
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "per", per)
        object.__setattr__(self, "burst", burst)
        object.__setattr__(self, "credit", _credit(self.credit))

    def __repr__(self) -> str:
        # (credit only when set: the repr of a limit without it is what it always was.)
        credit = "" if self.credit is None else f", credit={self.credit!r}"
        return f"Limit(rate={self.rate!r}, per={self.per!r}, burst={self.burst!r}{credit})"

    @property
    def rate_per_second(self) -> float:
        """Tokens added to the bucket each second."""
        return self.rate / self.per

    @property
    def capacity(self) -> float:
        """The bucket size (``burst``), always set once the limit is built."""
        assert self.burst is not None
        return self.burst

    @property
    def credit_cap(self) -> float:
        """The most credit the bank holds (0 without credit)."""
        return self.credit or 0.0

    @classmethod
    def parse(cls, text: str, burst: float | None = None, credit: float | None = None) -> Limit:
        """Build a limit from ``"100/s"``, ``"6000/m"``, ``"10/h"``, ``"5/2s"`` or ``"1/d"``.

        Raises:
            InvalidLimit: the text is not ``<rate>/[<count>]<unit>`` or its values are out of
                bounds.
        """
        if not isinstance(text, str):
            raise InvalidLimit(f"a limit must be a string like '100/s', got {_shown(text)}")
        if len(text) > MAX_LIMIT_TEXT:
            raise InvalidLimit(
                f"a limit is at most {MAX_LIMIT_TEXT} characters, got {_shown(text)}: {_SYNTAX}"
            )
        rate_text, slash, per_text = text.partition("/")
        rate = _RATE_RE.fullmatch(rate_text.strip())
        per = _PER_RE.fullmatch(per_text.strip())
        if not slash or rate is None or per is None:
            raise InvalidLimit(f"cannot parse limit {_shown(text)}: {_SYNTAX}")
        unit = per["unit"].lower()
        if unit not in _UNITS:
            raise InvalidLimit(
                f"unknown time unit {_shown(per['unit'])} in {_shown(text)}; use ms, s, m, h or d"
            )
        count = float(per["count"]) if per["count"] else 1.0
        return cls(float(rate[0]), per=count * _UNITS[unit], burst=burst, credit=credit)

    def __str__(self) -> str:
        credit = "" if self.credit is None else f" credit {self.credit:g}"
        return f"{self.rate:g}/{self.per:g}s burst {self.capacity:g}{credit}"


def _credit(value: object) -> float | None:
    """A credit as given (None or 0: none), checked: a finite number in [0, MAX_BURST]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidLimit(f"credit must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number) or number < 0 or number > MAX_BURST:
        raise InvalidLimit(
            f"credit must be a finite number from 0 to {MAX_BURST:g} tokens, got {_shown(value)}"
        )
    return number or None
