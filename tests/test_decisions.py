"""One behaviour suite: the decision table, run unchanged over every backend.

The backends: Redis Functions (``FCALL``: plans cached between calls), the same scripts as
``EVALSHA`` (no cache: the plan is made on every call), the embedded engine (fakeredis and
lupa, in process) and ``AsyncLimiter`` (asyncio, on the real server). Each gets the same
calls through a facade (``Backend``) and must return the same, and leave the same state.

A case is a list of steps run in order. A decision step names its mode (``"acquire"``,
``"peek"``, ``"refund"``) with the tenant, optional ``queue`` / ``priority`` / ``cost`` /
``hold``, and what it must return (``allowed``, ``denied_by``, ``wait_ms``, ``remaining``,
``would_deny``) or ``raises`` (``allow`` and ``deny`` write the usual ones). Other steps
configure (``set``, ``delete``, ``exempt``, ``dry_run``, ``record``), read the configuration
back (``get``, ``limits``), write or check bucket state directly (``freeze``, ``untouched``,
``stored``, ``tenant_fields``, ``expires``) or call ``acquire.lua`` with raw arguments
(``raw``: what another client, or a bug, could send). Cases made with ``frozen`` decide once
on frozen bucket state and are checked exactly; the others run on buckets of about one token
an hour, and allow for the refill of a test run.
"""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from bucket_state import approx, read_bucket, stored_text, write_bucket

from queue_ratelimit import (
    AsyncLimiter,
    BackendError,
    CostExceedsBurst,
    InvalidCost,
    InvalidLimit,
    Limit,
    Limiter,
    RateLimitError,
    ScopeLimit,
)
from queue_ratelimit._core import MAX_WAIT, translated
from queue_ratelimit._embedded import embedded_client
from queue_ratelimit._keys import KeySpace

HOUR = 3600.0
MAX_WAIT_MS = MAX_WAIT * 1000
# Rates of a few tokens per hour refill about 0.001 token per second, so a case that runs in
# well under a second sees the exact token counts below, give or take TOKENS.
TOKENS = 0.02
WAIT_REL = 2e-3
MODES = ("acquire", "peek", "refund")
BACKENDS = ("functions", "evalsha", "embedded", "async")


class Backend:
    """A limiter of one backend behind synchronous calls, with a synchronous client on the
    same data (to write and read bucket state directly)."""

    def __init__(self, name: str, limiter: Limiter | AsyncLimiter, client: Any) -> None:
        self.name = name
        self.limiter = limiter
        self.client = client
        self._loop = asyncio.new_event_loop() if isinstance(limiter, AsyncLimiter) else None

    @property
    def keys(self) -> KeySpace:
        return self.limiter.keys

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.limiter, method)(*args, **kwargs)
        return self._loop.run_until_complete(result) if self._loop else result

    def raw(self, script: str, keys: list[str], args: list[str]) -> Any:
        """Run one of the package's scripts with these arguments, unchecked."""
        scripts = self.limiter._scripts
        if self._loop:
            return self._loop.run_until_complete(scripts.acall(script, keys, args))
        return scripts.call(script, keys, args)

    def flush(self) -> None:
        """Write the counts the server keeps in memory (Functions only: _counters.py)."""
        self.raw("counters.lua", [self.keys.shared], [])

    def close(self) -> None:
        if self._loop:
            assert isinstance(self.limiter, AsyncLimiter)
            self._loop.run_until_complete(self.limiter.aclose())
            self._loop.close()
        else:
            assert isinstance(self.limiter, Limiter)
            self.limiter.close()


def open_backend(name: str, redis_url: str, namespace: str) -> Backend:
    if name == "embedded":
        lim = Limiter(embedded_client(), namespace=namespace)
        return Backend(name, lim, lim.client)
    client = redis.Redis.from_url(redis_url)
    if name == "async":
        return Backend(name, AsyncLimiter.from_url(redis_url, namespace=namespace), client)
    lim = Limiter(client, namespace=namespace)
    lim._scripts.transport = "fcall" if name == "functions" else "evalsha"
    return Backend(name, lim, client)


def drop(backend: Backend) -> None:
    """Delete the backend's keys (a real server outlives the test) and close it."""
    keys = list(backend.client.scan_iter(match=f"{backend.keys.base}:*", count=1000))
    if keys:
        backend.client.delete(*keys)
    backend.close()
    backend.client.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, redis_url: str, namespace: str) -> Iterator[Backend]:
    """Each backend in turn, in a namespace of its own."""
    opened = open_backend(request.param, redis_url, namespace)
    yield opened
    drop(opened)


@pytest.fixture
def reference(redis_url: str) -> Iterator[Backend]:
    """Redis Functions, in a namespace of its own: what every backend must match."""
    opened = open_backend("functions", redis_url, f"r{uuid.uuid4().hex[:12]}")
    yield opened
    drop(opened)


def allow(
    tenant: str, remaining: dict[str, float], *, mode: str = "acquire", **fields: Any
) -> dict[str, Any]:
    """A decision step (``mode``: acquire, peek or refund) that must be allowed and leave
    ``remaining``; ``fields``: its other arguments and promises (``queue``, ``cost``,
    ``would_deny``, ``credit``...)."""
    return {mode: tenant, **fields, "allowed": True, "remaining": remaining}


def deny(
    tenant: str,
    denied_by: str,
    wait_ms: float,
    remaining: dict[str, float],
    *,
    mode: str = "acquire",
    **fields: Any,
) -> dict[str, Any]:
    """A decision step that must be denied by ``denied_by``, with that wait, leaving
    ``remaining``; ``fields`` as for ``allow``."""
    step = {mode: tenant, **fields, "allowed": False, "denied_by": denied_by}
    return {**step, "wait_ms": wait_ms, "remaining": remaining}


def frozen(
    id: str,
    limits: dict[str, Limit],
    state: dict[str, float],
    cost: float,
    allowed: bool,
    remaining: dict[str, float],
    wait_ms: float = 0.0,
    denied_by: str | None = None,
    queue: str | None = None,
    tenant: str = "acme",
) -> dict[str, Any]:
    """A case of one decision on frozen bucket state (``state``; other buckets are full): a
    peek says the tokens before it, the acquire after it; a denial writes no bucket."""
    outcome = {"allowed": allowed, "denied_by": denied_by, "wait_ms": wait_ms}
    debit = cost if allowed else 0
    steps: list[dict[str, Any]] = [{"set": s, "limit": v} for s, v in limits.items()]
    steps += [
        {"freeze": state},
        {
            "peek": tenant,
            "queue": queue,
            "cost": cost,
            **outcome,
            "remaining": {s: v + debit for s, v in remaining.items()},
        },
        {"acquire": tenant, "queue": queue, "cost": cost, **outcome, "remaining": remaining},
        {"stored": remaining} if allowed else {"untouched": True},
    ]
    return {"id": id, "exact": True, "steps": steps}


def one_bucket(
    id: str,
    limit: Limit,
    tokens: float | None,
    cost: float,
    left: float,
    wait_ms: float | None = None,
) -> dict[str, Any]:
    """``frozen`` with acme's own limit alone: ``tokens`` in its bucket (None: full),
    ``left`` after the decision; denied by that bucket, with ``wait_ms``, when it is given."""
    scope = "tenant:acme"
    state = {} if tokens is None else {scope: tokens}
    if wait_ms is None:
        return frozen(id, {scope: limit}, state, cost, True, {scope: left})
    return frozen(
        id, {scope: limit}, state, cost, False, {scope: left}, wait_ms=wait_ms, denied_by=scope
    )


# -- sequences on slow buckets (about a token an hour) -------------------------------------

SEQUENCES: list[dict[str, Any]] = [
    {
        "id": "default-tenant-bucket",
        "steps": [
            {"set": "tenant:*", "limit": "3/h"},
            allow("acme", {"tenant:acme": 2}),
            allow("acme", {"tenant:acme": 1}),
            allow("acme", {"tenant:acme": 0}),
            deny("acme", "tenant:acme", 1_200_000, {"tenant:acme": 0}),
            # Every tenant has a bucket of its own: acme's flood leaves beta's full.
            allow("beta", {"tenant:beta": 2}),
        ],
    },
    {
        "id": "own-limit-overrides-default",
        "steps": [
            {"set": "tenant:*", "limit": "1/h"},
            {"set": "tenant:acme", "limit": "5/h"},
            allow("acme", {"tenant:acme": 4}),
            allow("beta", {"tenant:beta": 0}),
            deny("beta", "tenant:beta", 3_600_000, {"tenant:beta": 0}),
        ],
    },
    {
        "id": "all-or-nothing-global",
        "steps": [
            {"set": "global", "limit": "2/h"},
            {"set": "tenant:*", "limit": "10/h"},
            allow("acme", {"tenant:acme": 9, "global": 1}),
            allow("beta", {"tenant:beta": 9, "global": 0}),
            # Denied by global: acme's own bucket keeps its 9 tokens.
            deny("acme", "global", 1_800_000, {"tenant:acme": 9, "global": 0}, priority="high"),
            deny("acme", "global", 1_800_000, {"tenant:acme": 9, "global": 0}, mode="peek"),
        ],
    },
    {
        "id": "cost-and-burst",
        "steps": [
            {"set": "tenant:*", "limit": "10/h"},
            allow("acme", {"tenant:acme": 6}, cost=4),
            deny("acme", "tenant:acme", 360_000, {"tenant:acme": 6}, cost=7),
            allow("acme", {"tenant:acme": 0}, cost=6),
            {"acquire": "acme", "cost": 11, "raises": CostExceedsBurst},
            {"peek": "acme", "cost": 11, "raises": CostExceedsBurst},
            deny("acme", "tenant:acme", 3_600_000, {"tenant:acme": 0}, cost=10),
        ],
    },
    {
        "id": "fractional-cost-burst-one",
        "steps": [
            {"set": "tenant:*", "limit": "1/h"},
            allow("acme", {"tenant:acme": 0.5}, cost=0.5),
            allow("acme", {"tenant:acme": 0}, cost=0.5),
            deny("acme", "tenant:acme", 1_800_000, {"tenant:acme": 0}, cost=0.5),
        ],
    },
    {
        "id": "peek-and-refund",
        "steps": [
            {"set": "tenant:*", "limit": "5/h"},
            allow("acme", {"tenant:acme": 5}, mode="peek", cost=2),
            allow("acme", {"tenant:acme": 2}, cost=3),
            allow("acme", {"tenant:acme": 2}, mode="peek", cost=2),
            allow("acme", {"tenant:acme": 4}, mode="refund", cost=2),
            allow("acme", {"tenant:acme": 5}, mode="refund", cost=5),
        ],
    },
    {
        "id": "tenant-queue",
        "steps": [
            {"set": "tenant:acme", "limit": "5/h"},
            {"set": "tenant:acme:queue:emails", "limit": "2/h"},
            allow("acme", {"tenant:acme:queue:emails": 1, "tenant:acme": 4}, queue="emails"),
            allow("acme", {"tenant:acme:queue:emails": 0, "tenant:acme": 3}, queue="emails"),
            deny(
                "acme",
                "tenant:acme:queue:emails",
                1_800_000,
                {"tenant:acme:queue:emails": 0, "tenant:acme": 3},
                queue="emails",
            ),
            allow("acme", {"tenant:acme": 2}, queue="reports"),
            # No limit applies to beta at all.
            allow("beta", {}, queue="emails"),
        ],
    },
    {
        "id": "default-tenant-queue",
        "steps": [
            {"set": "tenant:*:queue:emails", "limit": "1/h"},
            allow("acme", {"tenant:acme:queue:emails": 0}, queue="emails"),
            allow("beta", {"tenant:beta:queue:emails": 0}, queue="emails"),
            deny(
                "acme",
                "tenant:acme:queue:emails",
                3_600_000,
                {"tenant:acme:queue:emails": 0},
                queue="emails",
            ),
        ],
    },
    {
        "id": "queue-scope-is-shared",
        "steps": [
            {"set": "queue:emails", "limit": "2/h"},
            allow("acme", {"queue:emails": 1}, queue="emails"),
            allow("beta", {"queue:emails": 0}, queue="emails", priority="low"),
            deny("gamma", "queue:emails", 1_800_000, {"queue:emails": 0}, queue="emails"),
        ],
    },
    {
        "id": "shadow-scope",
        "steps": [
            {"set": "tenant:*", "limit": "1/h", "shadow": True},
            allow("acme", {"tenant:acme": 0}),
            # Would deny, is allowed; the shadow bucket spends only what it could grant.
            allow("acme", {"tenant:acme": 0}, would_deny=("tenant:acme",)),
            allow("acme", {"tenant:acme": 0}, mode="peek", would_deny=("tenant:acme",)),
        ],
    },
    {
        "id": "namespace-dry-run",
        "steps": [
            {"set": "global", "limit": "1/h"},
            {"dry_run": True},
            allow("acme", {"global": 0}),
            allow("beta", {"global": 0}, would_deny=("global",)),
            {"dry_run": False},
            deny("gamma", "global", 3_600_000, {"global": 0}),
        ],
    },
    {
        "id": "exempt-tenants",
        "steps": [
            {"set": "global", "limit": "3/h"},
            {"set": "tenant:*", "limit": "1/h"},
            {"exempt": "vip", "mode": "tenant"},
            allow("vip", {"global": 2}),
            allow("vip", {"global": 1}),
            allow("acme", {"tenant:acme": 0, "global": 0}),
            deny("vip", "global", 1_200_000, {"global": 0}),
            {"exempt": "boss", "mode": "all"},
            allow("boss", {}),
            {"exempt": "vip", "mode": None},
            deny("vip", "global", 1_200_000, {"tenant:vip": 1, "global": 0}),
        ],
    },
    {
        "id": "limit-lowered-then-raised",
        "steps": [
            {"set": "tenant:*", "limit": "10/h"},
            allow("acme", {"tenant:acme": 9}),
            {"set": "tenant:*", "limit": "5/h"},
            allow("acme", {"tenant:acme": 4}),
            # A raised limit grants no windfall: the bucket refills at the new rate.
            {"set": "tenant:*", "limit": "20/h"},
            allow("acme", {"tenant:acme": 3}),
        ],
    },
    {
        "id": "delete-and-set-again",
        "steps": [
            {"set": "tenant:acme", "limit": "2/h"},
            allow("acme", {"tenant:acme": 1}),
            allow("acme", {"tenant:acme": 0}),
            {"delete": "tenant:acme"},
            allow("acme", {}),
            # Deleting a limit keeps its bucket: setting it again hands out no fresh burst.
            {"set": "tenant:acme", "limit": "2/h", "burst": 3},
            deny("acme", "tenant:acme", 1_800_000, {"tenant:acme": 0}),
        ],
    },
]

# The calls once compared between Limiter and AsyncLimiter, now checked on every backend.
SEQUENCES.append(
    {
        "id": "mixed-calls",
        "steps": [
            {"set": "tenant:*", "limit": Limit(1, per=HOUR, burst=3)},
            {"set": "global", "limit": "10/h", "shadow": True},
            {"set": "tenant:acme:queue:q", "limit": Limit(1, per=HOUR, burst=2)},
            {"get": "tenant:*", "is": ScopeLimit("tenant:*", Limit(1, per=HOUR, burst=3))},
            allow(
                "acme",
                {"tenant:acme:queue:q": 1, "tenant:acme": 2, "global": 9},
                queue="q",
                priority="high",
            ),
            deny(
                "acme",
                "tenant:acme:queue:q",
                3_600_000,
                {"tenant:acme:queue:q": 1, "tenant:acme": 2, "global": 9},
                mode="peek",
                queue="q",
                cost=2,
            ),
            allow("acme", {"tenant:acme:queue:q": 0, "tenant:acme": 1, "global": 8}, queue="q"),
            deny(
                "acme",
                "tenant:acme:queue:q",
                3_600_000,
                {"tenant:acme:queue:q": 0, "tenant:acme": 1, "global": 8},
                queue="q",
            ),
            allow(
                "acme",
                {"tenant:acme:queue:q": 0.5, "tenant:acme": 1.5, "global": 8.5},
                mode="refund",
                queue="q",
                cost=0.5,
            ),
            allow("acme", {"tenant:acme": 0, "global": 7}, cost=1.5),
            deny("acme", "tenant:acme", 3_600_000, {"tenant:acme": 0, "global": 7}),
            {"exempt": "acme", "mode": "tenant"},
            allow("acme", {"global": 5}, cost=2),
            {"delete": "tenant:acme:queue:q"},
            {
                "limits": {
                    "global": ScopeLimit("global", Limit(10, per=HOUR), True),
                    "tenant:*": ScopeLimit("tenant:*", Limit(1, per=HOUR, burst=3)),
                }
            },
        ],
    }
)

# -- one decision on frozen bucket state ----------------------------------------------------

FROZEN = [
    frozen("no limits", {}, {}, 1, True, {}),
    one_bucket("1/hour fresh", Limit(1, per=HOUR), None, 1, 0),
    one_bucket("1/hour empty", Limit(1, per=HOUR), 0, 1, 0, wait_ms=3_600_000),
    one_bucket("1/hour half a token", Limit(1, per=HOUR), 0.5, 1, 0.5, wait_ms=1_800_000),
    one_bucket("1e6/s cost = burst", Limit(1e6), None, 1e6, 0),
    one_bucket("1e6/s empty, cost = burst", Limit(1e6), 0, 1e6, 0, wait_ms=1000),
    one_bucket("1e6/s one token short", Limit(1e6), 0, 1, 0, wait_ms=0.001),
    one_bucket("burst 1 fresh", Limit(10, burst=1), None, 1, 0),
    one_bucket("burst 1 empty", Limit(10, burst=1), 0, 1, 0, wait_ms=100),
    one_bucket("cost = burst", Limit(5, per=60, burst=5), None, 5, 0),
    one_bucket("cost = burst, one token short", Limit(5, per=60, burst=5), 4, 5, 4, wait_ms=12_000),
    one_bucket("fractional cost fits", Limit(1, burst=1), 0.75, 0.25, 0.5),
    one_bucket("fractional cost short", Limit(1, burst=1), 0.1, 0.35, 0.1, wait_ms=250),
    one_bucket(
        "float rounding: 0.1 + 0.2 tokens admit a cost of 0.3", Limit(1, burst=1), 0.1 + 0.2, 0.3, 0
    ),
    frozen(
        "global waits longest",
        {"tenant:acme": Limit(10), "global": Limit(1)},
        {"tenant:acme": 0, "global": 0},
        1,
        False,
        {"tenant:acme": 0, "global": 0},
        wait_ms=1000,
        denied_by="global",
    ),
    frozen(
        "tenant waits longest",
        {"tenant:acme": Limit(1, per=60), "global": Limit(100)},
        {"tenant:acme": 0, "global": 0},
        1,
        False,
        {"tenant:acme": 0, "global": 0},
        wait_ms=60_000,
        denied_by="tenant:acme",
    ),
    frozen(
        "only the global bucket is short",
        {"tenant:acme": Limit(10), "global": Limit(4)},
        {"global": 0.5},
        1,
        False,
        {"tenant:acme": 10, "global": 0.5},
        wait_ms=125,
        denied_by="global",
    ),
    frozen(
        "four buckets, all admit",
        {
            "tenant:acme:queue:q": Limit(10),
            "tenant:acme": Limit(20),
            "queue:q": Limit(30),
            "global": Limit(40),
        },
        {"tenant:acme:queue:q": 5, "queue:q": 7},
        2,
        True,
        {"tenant:acme:queue:q": 3, "tenant:acme": 18, "queue:q": 5, "global": 38},
        queue="q",
    ),
    frozen(
        "four buckets, the queue bucket waits longest",
        {
            "tenant:acme:queue:q": Limit(10),
            "tenant:acme": Limit(20),
            "queue:q": Limit(1),
            "global": Limit(40),
        },
        {"tenant:acme:queue:q": 0, "queue:q": 0, "global": 0},
        1,
        False,
        {"tenant:acme:queue:q": 0, "tenant:acme": 20, "queue:q": 0, "global": 0},
        wait_ms=1000,
        denied_by="queue:q",
        queue="q",
    ),
    frozen(
        "tenant:queue bucket only applies to its queue",
        {"tenant:acme:queue:q": Limit(1), "tenant:acme": Limit(5)},
        {"tenant:acme:queue:q": 0},
        1,
        True,
        {"tenant:acme": 4},
        queue="other",
    ),
    frozen(
        "default tenant:* applies as the tenant's own scope",
        {"tenant:*": Limit(3)},
        {"tenant:acme": 1},
        1,
        True,
        {"tenant:acme": 0},
    ),
    frozen(
        "default tenant:*:queue:q applies as the tenant's own queue scope",
        {"tenant:*:queue:q": Limit(2)},
        {"tenant:acme:queue:q": 0},
        1,
        False,
        {"tenant:acme:queue:q": 0},
        wait_ms=500,
        denied_by="tenant:acme:queue:q",
        queue="q",
    ),
    frozen(
        "a tenant's own limit overrides tenant:*",
        {"tenant:*": Limit(1), "tenant:acme": Limit(100)},
        {},
        50,
        True,
        {"tenant:acme": 50},
    ),
    frozen(
        "a tenant-queue limit overrides tenant:*:queue:q",
        {"tenant:*:queue:q": Limit(1), "tenant:acme:queue:q": Limit(100)},
        {},
        50,
        True,
        {"tenant:acme:queue:q": 50},
        queue="q",
    ),
    frozen(
        "another tenant's limit does not apply",
        {"tenant:*": Limit(5), "tenant:other": Limit(1)},
        {"tenant:other": 0},
        1,
        True,
        {"tenant:acme": 4},
    ),
]

# -- numbers at the edges (issue #11, finding 2) --------------------------------------------
# Each either works exactly or is refused with a typed error before anything is written.

SLOWEST = {"rate": 1e-7}  # Limit's minimum: a token every 116 days
EDGES: list[dict[str, Any]] = [
    one_bucket(
        "slowest rate: one token short waits 1e10 ms", Limit(1e-7, burst=1), 0, 1, 0, wait_ms=1e10
    ),
    one_bucket(
        "fastest rate, largest burst: all of it at once", Limit(1e9, burst=1e12), None, 1e12, 0
    ),
    one_bucket(
        "fastest rate: one token short waits a microsecond",
        Limit(1e9, burst=1e12),
        0,
        1,
        0,
        wait_ms=1e-6,
    ),
    one_bucket(
        "a wait longer than MAX_WAIT is reported as MAX_WAIT",
        Limit(1e-7, burst=1e12),
        0,
        1e12,
        0,
        wait_ms=MAX_WAIT_MS,
    ),
    one_bucket("cost 0.5 of a one-token bucket", Limit(1, burst=1), 1, 0.5, 0.5),
    one_bucket(
        "cost 0.5 with a quarter token left waits 250 ms",
        Limit(1, burst=1),
        0.25,
        0.5,
        0.25,
        wait_ms=250,
    ),
    one_bucket("the smallest cost, one token left", Limit(1, burst=1), 1, 1e-6, 1 - 1e-6),
    {
        # A wait of 9.9e+17 us once reached Redis as text it refused, after the bucket was
        # written (the tokens were gone, the call raised).
        "id": "huge cost on a slow bucket: admitted, then a clamped wait",
        "steps": [
            {"set": "tenant:attacker", "limit": "1/115d", "burst": 100_000},
            {"set": "tenant:*", "limit": Limit(1, per=HOUR, burst=1)},
            allow("attacker", {"tenant:attacker": 0}, cost=1e5),
            deny("attacker", "tenant:attacker", MAX_WAIT_MS, {"tenant:attacker": 0}, cost=1e5),
            deny("attacker", "tenant:attacker", MAX_WAIT_MS, {"tenant:attacker": 0}, cost=1e5),
            {"expires": "attacker", "within_ms": 2 * MAX_WAIT_MS},
            allow("quiet", {"tenant:quiet": 0}),
            deny("quiet", "tenant:quiet", 3_600_000, {"tenant:quiet": 0}),
        ],
    },
    {
        # The expiry of the tenant hash was refill time + retention: 1e19 s, which PEXPIREAT
        # refused after the bucket had been written.
        "id": "largest burst on the slowest rate: admitted, the tenant hash expires",
        "steps": [
            {"set": "tenant:acme", "limit": Limit(1e-7, burst=1e12)},
            allow("acme", {"tenant:acme": 0}, cost=1e12),
            {"stored": {"tenant:acme": 0}},
            {"expires": "acme", "within_ms": 2 * MAX_WAIT_MS},
            deny("acme", "tenant:acme", MAX_WAIT_MS, {"tenant:acme": 0}, cost=1e12),
        ],
    },
    {
        # Older versions stored an expiry PEXPIREAT refused: the hash never expired.
        "id": "an expiry that was never applied is set again",
        "steps": [
            {"set": "tenant:acme", "limit": "10/h"},
            {"tenant_fields": ("acme", {"x": "9.9360000017965085e+21", "n:a": "1"})},
            allow("acme", {"tenant:acme": 9}),
            {"expires": "acme", "within_ms": 2 * MAX_WAIT_MS},
        ],
    },
    {
        # A fractional cost made the second's field a float; a whole cost after it in the same
        # second then failed (HINCRBY), after the decision had been counted.
        "id": "recorded traffic: fractional and whole costs in one second",
        "steps": [
            {"set": "tenant:*", "limit": "10/h"},
            {"record": 120},
            allow("acme", {"tenant:acme": 9.5}, cost=0.5),
            allow("acme", {"tenant:acme": 8.5}, cost=1),
            allow("acme", {"tenant:acme": 8}, cost=0.5),
            allow("acme", {"tenant:acme": 7}, cost=1),
        ],
    },
    {
        # The rounding slack (1e-9 tokens) once admitted a cost this small from an empty
        # bucket again and again.
        "id": "costs outside [1e-6, 1e12] are refused",
        "steps": [
            {"set": "tenant:acme", "limit": Limit(1, per=HOUR, burst=1)},
            {"freeze": {"tenant:acme": 0}},
            {"acquire": "acme", "cost": 1e-10, "raises": InvalidCost},
            {"acquire": "acme", "cost": 5e-324, "raises": InvalidCost},
            {"acquire": "acme", "cost": 1e12 * (1 + 1e-15), "raises": InvalidCost},
            {"acquire": "acme", "cost": 2**63, "raises": InvalidCost},
            {"peek": "acme", "cost": 2**1100, "raises": InvalidCost},
            {"refund": "acme", "cost": math.nan, "raises": InvalidCost},
            {"acquire": "acme", "cost": -0.0, "raises": InvalidCost},
            {"untouched": True},
            {"acquire": "acme", "cost": 2, "raises": CostExceedsBurst},
            {"untouched": True},
        ],
    },
    {
        "id": "limits outside float-safe bounds are refused",
        "steps": [
            {"set": "tenant:acme", "limit": {"rate": 1e-300}, "raises": InvalidLimit},
            {"set": "tenant:acme", "limit": {"rate": 1e300}, "raises": InvalidLimit},
            {
                "set": "tenant:acme",
                "limit": {"rate": 1, "burst": 2**53 + 1},
                "raises": InvalidLimit,
            },
            {
                "set": "tenant:acme",
                "limit": {"rate": 5e-324, "per": 5e-324},
                "raises": InvalidLimit,
            },
            {"set": "tenant:acme", "limit": "1/s", "burst": 1e12 + 1, "raises": InvalidLimit},
            {"limits": {}},
        ],
    },
    {
        # What the Python side refuses, another client could still send: the scripts check
        # every number before they write. (Before, a negative cost minted tokens, and "inf"
        # or a huge retention failed after the counters were written.)
        "id": "raw arguments are checked before anything is written",
        "steps": [
            {"set": "tenant:acme", "limit": Limit(1, per=HOUR, burst=5)},
            {"freeze": {"tenant:acme": 2}},
            {"raw": ["acme", "", "", "-1"], "raises": BackendError},
            {"raw": ["acme", "", "", "nan"], "raises": BackendError},
            {"raw": ["acme", "", "", "inf"], "raises": BackendError},
            {"raw": ["acme", "", "", "1e13"], "raises": BackendError},
            {"raw": ["acme", "", "", "1e-10"], "raises": BackendError},
            {"raw": ["acme", "", "", "1", "1e300"], "raises": BackendError},
            {"raw": ["acme", "", "", "1", "0"], "raises": BackendError},
            {"raw": ["acme", "", "", "1", "", "acquire", "1e300"], "raises": BackendError},
            {"raw": ["acme", "", "", "1", "", "acquire", "-5"], "raises": BackendError},
            {"raw": ["acme", "", "", "1", "", "take"], "raises": BackendError},
            # The keys name the tenant and the config hash: a tenant hash of another
            # namespace, or a key that is no shared hash, is refused.
            {"raw": ["acme"], "tenant_key": "qrl:{elsewhere}:t:acme", "raises": BackendError},
            {"raw": ["acme"], "tenant_key": "BASE:t:", "raises": BackendError},
            {"raw": ["acme"], "tenant_key": "BASE:x:acme", "raises": BackendError},
            {"raw": ["acme"], "shared_key": "BASE:config", "raises": BackendError},
            {"untouched": True},
            {"raw": ["nobody", "", "", "inf", "", "refund"], "raises": BackendError},
            {"raw": ["nobody", "", "", "nan"], "raises": BackendError},
            {"limits": {"tenant:acme": ScopeLimit("tenant:acme", Limit(1, per=HOUR, burst=5))}},
            {"raw": ["acme", "", "", "2"], "reply": "1"},
            {"stored": {"tenant:acme": 0}},
        ],
    },
]


# -- what each denial is counted under ------------------------------------------------------
# The shared hash counts every denial and would-denial under the limit or cap that decided,
# as configured (tenant:* for every tenant under the default: a bounded set of names), and
# the tenant-denials zset counts each tenant's denials (the metrics' most-throttled
# tenants). Both were missing for tenant scopes: tenants counted only in their own hashes,
# which expire.


def counting(
    id: str,
    setup: list[dict[str, Any]],
    calls: list[tuple[str, str | None]],
    shared: dict[str, int],
    tenants: dict[str, int],
) -> dict[str, Any]:
    """A case: configure, ``acquire`` once per (tenant, queue) of ``calls`` (outcomes not
    checked here), then the shared hash's ``d:*`` / ``w:*`` fields and the tenant denials
    must be exactly these."""
    return {
        "id": f"counted-{id}",
        "steps": [*setup, {"calls": calls}, {"counted": {"shared": shared, "tenants": tenants}}],
    }


def one_an_hour(*scopes: str, shadow: bool = False) -> list[dict[str, Any]]:
    return [{"set": scope, "limit": "1/h", "shadow": shadow} for scope in scopes]


COUNTING = [
    counting(
        "tenant-default",
        one_an_hour("tenant:*"),
        [("acme", None)] * 3 + [("beta", None)] * 2,
        {"d:tenant:*": 3},
        {"acme": 2, "beta": 1},
    ),
    counting(
        "tenant-own-and-default",
        [*one_an_hour("tenant:*"), {"set": "tenant:acme", "limit": "2/h"}],
        [("acme", None)] * 3 + [("beta", None)] * 2,
        {"d:tenant:acme": 1, "d:tenant:*": 1},
        {"acme": 1, "beta": 1},
    ),
    counting(
        "tenant-queue-own-and-default",
        one_an_hour("tenant:*:queue:emails", "tenant:acme:queue:emails"),
        [("acme", "emails")] * 2 + [("beta", "emails")] * 3 + [("beta", "reports")] * 2,
        {"d:tenant:acme:queue:emails": 1, "d:tenant:*:queue:emails": 2},
        {"acme": 1, "beta": 2},
    ),
    counting(
        "queue-and-global",
        [*one_an_hour("queue:emails"), {"set": "global", "limit": "2/h"}],
        [("acme", "emails"), ("acme", "emails"), ("beta", None), ("beta", None)],
        {"d:queue:emails": 1, "d:global": 1},
        {"acme": 1, "beta": 1},
    ),
    counting(
        "shadow-tenant-scopes",
        one_an_hour("tenant:*", "tenant:acme:queue:emails", shadow=True),
        [("acme", "emails")] * 3 + [("beta", None)] * 2,
        {"w:tenant:*": 3, "w:tenant:acme:queue:emails": 2},
        {},
    ),
    counting(
        "concurrency-caps",
        [
            {"concurrency": "tenant:*", "n": 1},
            {"concurrency": "tenant:acme", "n": 2},
            {"concurrency": "tenant:*:queue:emails", "n": 1},
        ],
        [("acme", None)] * 3 + [("beta", None)] * 2 + [("gamma", "emails")] * 2,
        {"d:tenant:acme": 1, "d:tenant:*": 1, "d:tenant:*:queue:emails": 1},
        {"acme": 1, "beta": 1, "gamma": 1},
    ),
]

# -- burst credits and several windows per scope (#13) --------------------------------------

DAY = 86400.0


def credit_limit(rate: float, burst: float, credit: float) -> dict[str, float]:
    """A limit with burst credits of ``rate`` tokens an hour (built by the step: it may raise)."""
    return {"rate": rate, "per": HOUR, "burst": burst, "credit": credit}


CREDITS_AND_WINDOWS: list[dict[str, Any]] = [
    {
        # Bucket first, then the bank; a denial waits for the bucket's refill; a refund
        # fills the bucket first. Tenant 2 an hour, burst 2, credit 3: 5 at once.
        "id": "credit-spends-bucket-then-bank",
        "steps": [
            {"set": "tenant:*", "limit": credit_limit(2, 2, 3)},
            allow("acme", {"tenant:acme": 5}, mode="peek", credit={"tenant:acme": 3}),
            allow("acme", {"tenant:acme": 4}, credit={"tenant:acme": 3}),
            allow("acme", {"tenant:acme": 3}, credit={"tenant:acme": 3}),
            allow("acme", {"tenant:acme": 2}, credit={"tenant:acme": 2}),
            allow("acme", {"tenant:acme": 0}, cost=2, credit={"tenant:acme": 0}),
            deny("acme", "tenant:acme", 1_800_000, {"tenant:acme": 0}, credit={"tenant:acme": 0}),
            allow("acme", {"tenant:acme": 3}, mode="refund", cost=3, credit={"tenant:acme": 1}),
            allow("beta", {"tenant:beta": 4}, credit={"tenant:beta": 3}),
        ],
    },
    {
        # A cost above the burst fits in burst + credit; above both it never will.
        "id": "credit-admits-costs-up-to-burst-plus-credit",
        "steps": [
            {"set": "global", "limit": credit_limit(1, 2, 3)},
            allow("acme", {"global": 1}, cost=4, credit={"global": 1}),
            {"acquire": "acme", "cost": 6, "raises": CostExceedsBurst},
        ],
    },
    {
        "id": "credit-read-back",
        "steps": [
            {"set": "tenant:acme", "limit": credit_limit(2, 2, 3)},
            {
                "get": "tenant:acme",
                "is": ScopeLimit("tenant:acme", Limit(2, per=HOUR, burst=2, credit=3)),
            },
        ],
    },
    {
        # Every window must admit; the shortest under the scope's name, the others beside.
        "id": "windows-all-or-nothing",
        "steps": [
            {"set": "tenant:acme", "limit": ["2/h", "3/d"]},
            allow("acme", {"tenant:acme": 1, "tenant:acme (3/d)": 2}),
            allow("acme", {"tenant:acme": 0, "tenant:acme (3/d)": 1}),
            deny(
                "acme",
                "tenant:acme",
                1_800_000,
                {"tenant:acme": 0, "tenant:acme (3/d)": 1},
                window="2/h",
            ),
            {
                "get": "tenant:acme",
                "is": ScopeLimit(
                    "tenant:acme",
                    Limit(2, per=HOUR),
                    False,
                    (Limit(2, per=HOUR), Limit(3, per=DAY)),
                ),
            },
        ],
    },
    {
        # The daily window binds: its wait, its name. Given longest first, it keeps its
        # place in `remaining`, and its own fields.
        "id": "windows-the-long-one-binds",
        "steps": [
            {"set": "tenant:*", "limit": ["2/d", "5/h"]},
            allow("acme", {"tenant:acme (2/d)": 1, "tenant:acme": 4}),
            allow("acme", {"tenant:acme (2/d)": 0, "tenant:acme": 3}),
            deny(
                "acme",
                "tenant:acme",
                43_200_000,
                {"tenant:acme (2/d)": 0, "tenant:acme": 3},
                window="2/d",
            ),
            deny(
                "acme",
                "tenant:acme",
                43_200_000,
                {"tenant:acme (2/d)": 0, "tenant:acme": 3},
                mode="peek",
                window="2/d",
            ),
        ],
    },
    {
        # Shared scopes, windows of one period, a window with credit, and a single-window
        # scope beside them whose replies are as they always were.
        "id": "windows-shared-and-credit",
        "steps": [
            {"set": "queue:emails", "limit": ["3/h", "4/h", "9/d"]},
            {"set": "global", "limit": [credit_limit(1, 1, 1), "5/d"]},
            {"set": "tenant:*", "limit": "5/h"},
            allow(
                "acme",
                {
                    "tenant:acme": 4,
                    "queue:emails": 2,
                    "queue:emails (4/h)": 3,
                    "queue:emails (9/d)": 8,
                    "global": 1,
                    "global (5/d)": 4,
                },
                queue="emails",
                credit={"global": 1},
            ),
            allow("acme", {"tenant:acme": 3, "global": 0, "global (5/d)": 3}, credit={"global": 0}),
            deny(
                "acme",
                "global",
                3_600_000,
                {"tenant:acme": 3, "global": 0, "global (5/d)": 3},
                window="1/h",
                credit={"global": 0},
            ),
        ],
    },
    {
        "id": "windows-bad-lists",
        "steps": [
            {"set": "tenant:acme", "limit": [], "raises": InvalidLimit},
            {"set": "tenant:acme", "limit": ["1/h", "1/h"], "raises": InvalidLimit},
            {"set": "tenant:acme", "limit": ["1/h", "1/60m"], "raises": InvalidLimit},
            {
                "set": "tenant:acme",
                "limit": ["1/s", "1/m", "1/h", "1/d", "1/2d"],
                "raises": InvalidLimit,
            },
            {"set": "tenant:acme", "limit": ["1/h", 5], "raises": InvalidCost},
            {"set": "tenant:acme", "limit": credit_limit(1, 1, -1), "raises": InvalidLimit},
            {"set": "tenant:acme", "limit": credit_limit(1, 1, math.nan), "raises": InvalidLimit},
            {"set": "tenant:acme", "limit": credit_limit(1, 1, 1e13), "raises": InvalidLimit},
            {"set": "tenant:acme", "limit": credit_limit(1, 1, math.inf), "raises": InvalidLimit},
            {"limits": {}},
        ],
    },
]

# -- the stored form of tokens (lua/buckets.lua, tokens_text) ------------------------------


def stored_form(
    id: str, limit: Limit, text: str, cost: float, remaining: float, stored: str
) -> dict[str, Any]:
    """One admission of ``cost`` from acme's bucket frozen at ``text`` (as stored, perhaps in
    the form of an earlier version): what is left, and its text as stored now."""
    return {
        "id": id,
        "exact": True,
        "steps": [
            {"set": "tenant:*", "limit": limit},
            {"freeze": {"tenant:acme": text}},
            {
                "acquire": "acme",
                "cost": cost,
                "allowed": True,
                "remaining": {"tenant:acme": remaining},
            },
            {"stored_text": {"tenant:acme": stored}},
        ],
    }


DAY = 86400.0
STORED_FORMS: list[dict[str, Any]] = [
    # A fraction as the previous version stored it (%.17g), read as the number it is; what
    # is left is stored rounded down to a billionth.
    stored_form("old form read", Limit(3, per=HOUR), "2.7000000000000002", 1, 1.7, "1700000000e-9"),
    stored_form("less than a step left", Limit(3, per=HOUR), "1.0000000005", 1, 0, "0e-9"),
    # Past 9e6 tokens, millionths; past 9e9 (2^53 millionths is 9007199254.740992),
    # thousandths: the count of steps stays a whole double.
    stored_form(
        "millionths past 9e6",
        Limit(1e7, per=DAY, burst=1e7),
        "9000000.875",
        0.5,
        9000000.375,
        "9000000375000e-6",
    ),
    stored_form(
        "millionths up to 9e9",
        Limit(1e10, per=DAY, burst=1e10),
        "8999999999.75",
        0.5,
        8999999999.25,
        "8999999999250000e-6",
    ),
    stored_form(
        "thousandths around 2^53 millionths",
        Limit(1e10, per=DAY, burst=1e10),
        "9007199254.75",
        0.5,
        9007199254.25,
        "9007199254250e-3",
    ),
    stored_form(
        "a burst near 1e12",
        Limit(1e12, per=DAY, burst=1e12),
        "999999999999.75",
        0.5,
        999999999999.25,
        "999999999999250e-3",
    ),
    {
        # One token every 115 days: 0.5 over 57.5 days, and 1e-13 a microsecond of the
        # test's own run (a second of it adds 1e-7), counted in billionths all the same.
        "id": "a tiny rate refills by billionths",
        "exact": True,
        "steps": [
            {"set": "tenant:*", "limit": Limit(1, per=115 * DAY, burst=2)},
            {"aged": {"tenant:acme": (1.25, 57.5 * DAY)}},
            {"acquire": "acme", "cost": 0.5, "allowed": True, "remaining": {"tenant:acme": 1.25}},
            {"stored_match": {"tenant:acme": r"12500\d{5}e-9"}},
        ],
    },
]

CASES = SEQUENCES + FROZEN + EDGES + COUNTING + CREDITS_AND_WINDOWS + STORED_FORMS


def bucket_fields(backend: Backend) -> dict[str, dict[bytes, bytes]]:
    """Every bucket's stored tokens and clock, by key."""
    out = {}
    for key in backend.client.scan_iter(match=f"{backend.keys.base}:*", count=1000):
        if backend.client.type(key) == b"hash":
            fields = backend.client.hgetall(key)
            buckets = {f: v for f, v in fields.items() if f.startswith(b"b")}
            if buckets:
                out[key.decode()] = buckets
    return out


def run_case(backend: Backend, case: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a case's steps, checking the direct reads as they come; returns what each
    decision step produced, in order (and each step that raised)."""
    outcomes: list[dict[str, Any]] = []
    exact = case.get("exact", False)
    frozen_state: dict[str, dict[bytes, bytes]] = {}
    for step in case["steps"]:
        try:
            outcome = run_step(backend, step, exact, frozen_state)
        except RateLimitError as exc:
            outcomes.append({"raises": type(exc)})
            continue
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


def run_step(
    backend: Backend, step: dict[str, Any], exact: bool, frozen_state: dict[str, Any]
) -> dict[str, Any] | None:
    tokens = approx if exact else (lambda v: pytest.approx(v, abs=TOKENS))
    if "set" in step:
        limit = step["limit"]
        if isinstance(limit, str):
            limit = Limit.parse(limit, burst=step.get("burst"))
        elif isinstance(limit, dict):  # built here: it may raise
            limit = Limit(**limit)
        elif isinstance(limit, list):  # windows
            limit = [Limit(**w) if isinstance(w, dict) else w for w in limit]
        backend.call("set_limit", step["set"], limit, shadow=step.get("shadow", False))
    elif "delete" in step:
        backend.call("delete_limit", step["delete"])
    elif "exempt" in step:
        backend.call("set_exempt", step["exempt"], step["mode"])
    elif "dry_run" in step:
        backend.call("set_shadow", step["dry_run"])
    elif "record" in step:
        backend.call("set_recording", step["record"])
    elif "concurrency" in step:
        backend.call("set_concurrency", step["concurrency"], step["n"])
    elif "calls" in step:
        for tenant, queue in step["calls"]:
            backend.call("acquire", tenant, queue=queue)
    elif "counted" in step:
        backend.flush()
        shared = backend.client.hgetall(backend.keys.shared)
        assert {
            f.decode(): int(v) for f, v in shared.items() if f.startswith((b"d:", b"w:"))
        } == step["counted"]["shared"]
        denials = backend.client.zrange(backend.keys.tenant_denials, 0, -1, withscores=True)
        assert {t.decode(): n for t, n in denials} == step["counted"]["tenants"]
    elif "get" in step:
        assert backend.call("get_limit", step["get"]) == step["is"]
    elif "limits" in step:
        assert backend.call("limits") == step["limits"]
    elif "freeze" in step:
        for scope, value in step["freeze"].items():
            write_bucket(backend, scope, value)
        frozen_state.clear()
        frozen_state.update(bucket_fields(backend))
    elif "untouched" in step:
        assert bucket_fields(backend) == frozen_state, "a denial must write no bucket"
    elif "aged" in step:
        for scope, (value, age_s) in step["aged"].items():
            write_bucket(backend, scope, value, age_s=age_s)
    elif "stored_match" in step:
        for scope, pattern in step["stored_match"].items():
            assert re.fullmatch(pattern, stored_text(backend, scope) or ""), scope
    elif "stored_text" in step:
        for scope, text in step["stored_text"].items():
            assert stored_text(backend, scope) == text, scope
    elif "stored" in step:
        for scope, value in step["stored"].items():
            state = read_bucket(backend, scope)
            assert state is not None, scope
            assert state[0] == tokens(value), scope
    elif "tenant_fields" in step:
        tenant, fields = step["tenant_fields"]
        backend.client.hset(backend.keys.tenant(tenant), mapping=fields)
    elif "expires" in step:
        ttl_ms = backend.client.pttl(backend.keys.tenant(step["expires"]))
        assert 0 < ttl_ms <= step["within_ms"], "the tenant hash must expire, and not too late"
    elif "raw" in step:
        keys = backend.keys
        # lua/acquire.lua: the tenant hash, the shared hash; the arguments after the tenant.
        call_keys = [
            step.get("tenant_key", keys.tenant(step["raw"][0])).replace("BASE", keys.base),
            step.get("shared_key", keys.shared).replace("BASE", keys.base),
        ]
        try:
            reply = backend.raw("acquire.lua", call_keys, step["raw"][1:])
        except redis.RedisError as exc:
            error = translated(exc)
            if error is exc:
                raise
            raise error from exc
        return {"reply": reply.decode().split(" ")[0]}
    else:
        mode = next(m for m in MODES if m in step)
        args = {k: step[k] for k in ("queue", "priority", "cost", "hold") if k in step}
        d = backend.call(mode, step[mode], **args)
        assert bool(d) is d.allowed
        assert d.degraded is False
        assert d.retry_after == d.wait_ms / 1000
        return {
            "allowed": d.allowed,
            "denied_by": d.denied_by,
            "wait_ms": d.wait_ms,
            "remaining": dict(d.remaining),
            "would_deny": d.would_deny,
            "credit": dict(d.credit),
            "window": d.window,
        }
    return None


def expected(case: dict[str, Any]) -> list[dict[str, Any]]:
    """The outcome each decision step of a case promises, with the defaults filled in."""
    out: list[dict[str, Any]] = []
    for step in case["steps"]:
        if "raises" in step:
            out.append({"raises": step["raises"]})
        elif "raw" in step:
            out.append({"reply": step["reply"]})
        elif any(m in step for m in MODES):
            out.append(
                {
                    "allowed": step["allowed"],
                    "denied_by": step.get("denied_by"),
                    "wait_ms": step.get("wait_ms", 0.0),
                    "remaining": step["remaining"],
                    "would_deny": step.get("would_deny", ()),
                    "credit": step.get("credit", {}),
                    "window": step.get("window"),
                }
            )
    return out


def assert_same(got: list[dict[str, Any]], want: list[dict[str, Any]], exact: bool) -> None:
    """Outcomes equal; token counts and waits exactly (up to float rounding) for frozen
    cases, else within TOKENS and WAIT_REL."""
    assert len(got) == len(want), (got, want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if "raises" in w or "raises" in g or "reply" in w:
            assert g == w, f"step {i}"
            continue
        assert (g["allowed"], g["denied_by"], g["would_deny"], g["window"]) == (
            w["allowed"],
            w["denied_by"],
            w["would_deny"],
            w["window"],
        ), f"step {i}"
        assert list(g["remaining"]) == list(w["remaining"]), f"step {i}: scopes or their order"
        assert list(g["credit"]) == list(w["credit"]), f"step {i}: credit banks"
        for what in ("remaining", "credit"):
            for scope, value in w[what].items():
                if exact:
                    assert g[what][scope] == approx(value), f"step {i}: {what}"
                else:
                    assert g[what][scope] == pytest.approx(value, abs=TOKENS), f"step {i}: {what}"
        if exact:
            assert g["wait_ms"] == approx(w["wait_ms"]), f"step {i}"
        else:
            assert g["wait_ms"] == pytest.approx(w["wait_ms"], rel=WAIT_REL, abs=1), f"step {i}"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_decision_table(backend: Backend, case: dict[str, Any]) -> None:
    assert_same(run_case(backend, case), expected(case), case.get("exact", False))


def store_state(backend: Backend) -> dict[str, Any]:
    """Everything the scripts wrote, minus what depends on the moment it ran, by key less
    the namespace's base (namespaces differ between backends on one server)."""
    client, base = backend.client, backend.keys.base
    backend.flush()
    state: dict[str, Any] = {}
    for raw_key in sorted(client.scan_iter(match=f"{base}:*", count=1000)):
        key = raw_key.decode()
        name = key[len(base) :]
        if key == backend.keys.audit:
            entries = client.xrange(key)
            state[name] = [
                {k.decode(): v.decode() for k, v in f.items() if k != b"at_ms"} for _, f in entries
            ]
            continue
        if client.type(key) == b"zset":
            # The tenant denials' counts; slot holders' deadlines are times (left out).
            members = client.zrange(key, 0, -1, withscores=True)
            timed = key != backend.keys.tenant_denials
            state[name] = {m.decode(): None if timed else n for m, n in members}
            continue
        fields = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
        # Times differ between the runs: bucket clocks (<field>:u), the tenant hash's expiry
        # (x) and the config revision stamp (_rev) are left out; tokens and waits rounded.
        for field, value in list(fields.items()):
            if field in ("x", "_rev") or field.endswith(":u"):
                del fields[field]
            elif field == "b" or field.startswith(("bq:", "b:")):  # (banks b...:c too)
                fields[field] = round(float(value), 1)
            elif field == "h:us":
                fields[field] = round(float(value), -7)  # waits of an hour or so, in us
        state[name] = {"fields": fields, "expires": client.pttl(key) > 0}
    return state


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_backends_store_alike(backend: Backend, reference: Backend, case: dict[str, Any]) -> None:
    """Same replies as Redis Functions, and the same counters, buckets, expiries and audit
    trail in the store (the recorded traffic's per-minute keys too)."""
    if backend.name == "functions":
        pytest.skip("the reference itself")
    exact = case.get("exact", False)
    assert_same(run_case(backend, case), run_case(reference, case), exact)
    assert store_state(backend) == store_state(reference)
