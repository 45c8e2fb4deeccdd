"""Eight processes hammer one tenant: admissions stay within R·T + B and near R·T."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import pytest
import redis

from queue_ratelimit import Limit, Limiter
from queue_ratelimit._counters import flush_counters

PROCESSES = 8
RATE = 200.0
BURST = 50.0
SECONDS = 3.0


def server_us(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1_000_000 + int(micros)


def hammer(url: str, namespace: str, start: Any, seconds: float, results: Any) -> None:
    """Acquire as fast as possible for ``seconds`` once ``start`` is set; report the counts
    and the Redis times just before the first call and just after the last."""
    lim = Limiter.from_url(url, namespace=namespace)
    lim.peek("acme")  # connect and load the script before the clock starts
    start.wait(60)
    first = server_us(lim.client)  # before this worker's first call, on Redis's clock
    admitted = denied = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        if lim.acquire("acme", queue="work").allowed:
            admitted += 1
        else:
            denied += 1
    last = server_us(lim.client)  # after its last call
    results.put((admitted, denied, first, last))
    lim.close()


@pytest.mark.slow
def test_eight_processes_never_overspend(limiter: Limiter, redis_url: str) -> None:
    limiter.set_limit("tenant:acme", Limit(RATE, burst=BURST))
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=hammer, args=(redis_url, limiter.namespace, start, SECONDS, results))
        for _ in range(PROCESSES)
    ]
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
    admitted = sum(r[0] for r in reports)
    denied = sum(r[1] for r in reports)
    # T spans every call of every worker: from the earliest first call to the latest last.
    elapsed = (max(r[3] for r in reports) - min(r[2] for r in reports)) / 1e6
    assert admitted <= RATE * elapsed + BURST, f"{admitted} admitted in {elapsed:.3f}s"
    # Demand far exceeds the rate, so the bucket should be kept close to busy. The bound is
    # loose on purpose (workers start and stop a little apart).
    assert admitted >= 0.8 * RATE * SECONDS, f"only {admitted} admitted in {elapsed:.3f}s"
    assert denied > admitted, "the demand did not saturate the bucket"
    # The counters the script keeps are exact across processes.
    flush_counters(limiter)
    tenant = limiter.client.hgetall(limiter.keys.tenant("acme"))
    shared = limiter.client.hgetall(limiter.keys.shared)
    assert float(tenant[b"n:a"]) == admitted
    assert float(tenant[b"d:tenant:acme"]) == denied
    assert float(shared[b"a:q:work"]) == admitted
    histogram = {k: int(v) for k, v in shared.items() if k.startswith(b"h:") and k != b"h:us"}
    assert sum(histogram.values()) == denied
