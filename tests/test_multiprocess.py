"""Eight processes hammer one tenant: admissions stay within R·T + B and near R·T."""

from __future__ import annotations

import pytest
from race_support import race

from queue_ratelimit import Limit, Limiter
from queue_ratelimit._counters import flush_counters

PROCESSES = 8
RATE = 200.0
BURST = 50.0
SECONDS = 3.0


@pytest.mark.slow
def test_eight_processes_never_overspend(limiter: Limiter, redis_url: str) -> None:
    limiter.set_limit("tenant:acme", Limit(RATE, burst=BURST))
    # T spans every call of every worker: from the earliest first call to the latest last.
    admitted, denied, elapsed = race(limiter, redis_url, PROCESSES, SECONDS, queue="work")
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
