"""Processes racing on one tenant's buckets, on Redis's real clock (spawned, so each has its
own connections and nothing is shared but Redis)."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any, NamedTuple

from bucket_state import server_us

from queue_ratelimit import Limiter


class Race(NamedTuple):
    """What the workers of one race did, together."""

    admitted: int
    denied: int
    elapsed: float  # seconds from the earliest first call to the latest last, Redis's clock


def hammer(
    url: str, namespace: str, queue: str | None, start: Any, seconds: float, results: Any
) -> None:
    """Acquire for tenant acme as fast as possible for ``seconds`` once ``start`` is set;
    report the counts and the Redis times just before the first call and just after the
    last."""
    lim = Limiter.from_url(url, namespace=namespace)
    lim.peek("acme")  # connect and load the script before the clock starts
    start.wait(60)
    first = server_us(lim.client)  # before this worker's first call, on Redis's clock
    admitted = denied = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        if lim.acquire("acme", queue=queue).allowed:
            admitted += 1
        else:
            denied += 1
    last = server_us(lim.client)  # after its last call
    results.put((admitted, denied, first, last))
    lim.close()


def race(
    limiter: Limiter, redis_url: str, processes: int, seconds: float, queue: str | None = None
) -> Race:
    """``processes`` workers hammer ``limiter``'s namespace for ``seconds``, all released
    at once."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    args = (redis_url, limiter.namespace, queue, start, seconds, results)
    procs = [ctx.Process(target=hammer, args=args) for _ in range(processes)]
    for proc in procs:
        proc.start()
    try:
        start.set()
        reports = [results.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    return Race(
        admitted=sum(r[0] for r in reports),
        denied=sum(r[1] for r in reports),
        elapsed=(max(r[3] for r in reports) - min(r[2] for r in reports)) / 1e6,
    )
