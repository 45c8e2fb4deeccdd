"""``queue-ratelimit bench``: what a decision costs on *your* Redis, from this host.

For sizing: decisions per second one process gets from ``Limiter.acquire`` next to the floor
(``EVALSHA`` of ``return 1``: one round trip and nothing else) on the same connection, and the
server microseconds per decision, which bound what one Redis core sustains for everyone.
Slices of the two alternate, so a burst of other load spoils a slice rather than a side.
The floor goes through redis-py's ordinary command path, which ``acquire`` skips on plain
clients (it sends its command packed once), so on a fast network ``acquire`` may come close
to the floor or pass it: the ratio is how much a decision costs this process, not Redis.
The limits are set in a namespace of its own (far above what one process reaches, so they
never bind) and every key of it is deleted afterwards. Server time comes from the change in
``INFO commandstats`` over our own slices: on a busy server, other clients' scripts inflate
it, so read it as an upper bound there. The full comparison with other libraries is
``make bench`` (docs/benchmarks.md).
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from ._limit import Limit
from ._limiter import Limiter

NEVER_BINDS = Limit(1e9, per=1.0)
SCRIPT_COMMANDS = ("cmdstat_fcall", "cmdstat_evalsha")


def _script_stats(client: Any) -> tuple[int, int]:
    """(calls, microseconds) of every FCALL and EVALSHA the server ran so far."""
    stats = client.info("commandstats")
    calls = sum(int(stats.get(name, {}).get("calls", 0)) for name in SCRIPT_COMMANDS)
    usec = sum(int(stats.get(name, {}).get("usec", 0)) for name in SCRIPT_COMMANDS)
    return calls, usec


def _slice(call: Callable[[], object], seconds: float, client: Any) -> tuple[float, float]:
    """Calls per second over one slice, and server microseconds per call."""
    calls_before, usec_before = _script_stats(client)
    count, started = 0, time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(20):
            call()
        count += 20
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - started
    calls_after, usec_after = _script_stats(client)
    calls = max(1, calls_after - calls_before)
    return count / elapsed, (usec_after - usec_before) / calls


def run(client: Any, *, seconds: float = 5.0, buckets: int = 1, rounds: int = 10) -> dict[str, Any]:
    """Measure on ``client`` (a redis-py ``Redis``); returns the figures as a dict."""
    if buckets not in (1, 3):
        raise ValueError(f"buckets must be 1 or 3, got {buckets!r}")
    limiter = Limiter(client, namespace=f"bench-{uuid.uuid4().hex[:12]}")
    try:
        limiter.set_limit("tenant:*", NEVER_BINDS, actor="bench")
        queue: str | None = None
        if buckets == 3:
            queue = "bench"
            limiter.set_limit("global", NEVER_BINDS, actor="bench")
            limiter.set_limit("tenant:*:queue:bench", NEVER_BINDS, actor="bench")
        floor = client.register_script("return 1")

        def acquire() -> object:
            return limiter.acquire("acme", queue)

        for _ in range(200):  # warm up: connection, loaded scripts, plans
            floor()
            acquire()
        per_slice = seconds / (2 * rounds)
        floor_rates, acquire_rates, floor_us, acquire_us = [], [], [], []
        for _ in range(rounds):
            rate, server = _slice(floor, per_slice, client)
            floor_rates.append(rate)
            floor_us.append(server)
            rate, server = _slice(acquire, per_slice, client)
            acquire_rates.append(rate)
            acquire_us.append(server)
        server_us = statistics.median(acquire_us)
        return {
            "buckets": buckets,
            "transport": limiter._scripts.transport,
            "floor_per_s": round(statistics.median(floor_rates)),
            "acquire_per_s": round(statistics.median(acquire_rates)),
            "acquire_vs_floor": round(
                statistics.median(a / f for a, f in zip(acquire_rates, floor_rates, strict=True)),
                3,
            ),
            "server_us_per_decision": round(server_us, 2),
            "floor_server_us": round(statistics.median(floor_us), 2),
            "decisions_per_s_per_redis_core": round(1e6 / server_us) if server_us > 0 else None,
            "seconds": seconds,
            "rounds": rounds,
        }
    finally:
        keys = list(client.scan_iter(match=limiter.keys.pattern, count=1000))
        if keys:
            client.delete(*keys)
