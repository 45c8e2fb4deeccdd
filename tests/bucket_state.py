"""Reading and writing bucket state directly, as the scripts store it (for tests that need
a bucket to hold an exact number of tokens)."""

from __future__ import annotations

from typing import Any, Protocol

import pytest

from queue_ratelimit import Scope
from queue_ratelimit._keys import KeySpace

# A bucket whose "updated" time lies this far in the future refills nothing on the next
# decision (the script treats a clock that went backwards as no time elapsed), so tests can
# state exactly how many tokens a decision sees.
FROZEN_US = 3600 * 1_000_000


class Store(Protocol):
    """Where a limiter keeps its buckets: a ``Limiter``, or a test's facade of one (a
    synchronous client on the same data, and the key layout)."""

    @property
    def client(self) -> Any: ...

    @property
    def keys(self) -> KeySpace: ...


def server_us(client: Any) -> int:
    """Redis's clock, in microseconds: the only clock the limiter uses."""
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


def bucket_at(lim: Store, scope: str) -> tuple[str, str]:
    """The (key, field) of the Redis hash holding the bucket of ``scope``."""
    location = lim.keys.bucket_location(Scope.parse(scope))
    assert location is not None
    return location


def write_bucket(
    lim: Store, scope: str, tokens: float | str, *, age_s: float | None = None
) -> None:
    """Store a bucket's state directly: ``tokens`` (a number, or the text to store as is) as
    of ``age_s`` seconds ago on Redis's clock, or frozen (no refill on the next decision)
    when ``age_s`` is None."""
    key, hfield = bucket_at(lim, scope)
    now = server_us(lim.client)
    updated = now + FROZEN_US if age_s is None else now - round(age_s * 1_000_000)
    text = tokens if isinstance(tokens, str) else repr(tokens)
    lim.client.hset(key, mapping={hfield: text, f"{hfield}:u": updated})


def stored_text(lim: Store, scope: str) -> str | None:
    """A bucket's tokens as the scripts stored them (the text), or None when it has none."""
    key, hfield = bucket_at(lim, scope)
    raw = lim.client.hget(key, hfield)
    return None if raw is None else raw.decode()


def read_bucket(lim: Store, scope: str) -> tuple[float, int] | None:
    """The stored (tokens, updated_us) of a bucket, or None when it has no state (full)."""
    key, hfield = bucket_at(lim, scope)
    tokens, updated = lim.client.hmget(key, [hfield, f"{hfield}:u"])
    if tokens is None:
        return None
    return float(tokens), int(float(updated))


def approx(value: float) -> object:
    """Equal up to float rounding: for buckets whose state the test froze."""
    return pytest.approx(value, rel=1e-9, abs=1e-9)


def near(value: float) -> object:
    """Equal up to the refill of a slow (about 1/hour) bucket during a test run."""
    return pytest.approx(value, abs=0.01)
