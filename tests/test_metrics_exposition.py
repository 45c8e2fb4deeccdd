"""The /metrics exposition and the snapshot, to the byte, for a namespace that uses every
feature the metrics report: tenants, queues, priorities, caps, exemptions, a pause, burst
credits, several windows, a shadow limit and a fair backlog.

Redis's clock is pinned for the read (its ``TIME`` reply, on the scraping client only), an
hour before the pause ends and so before every write: no bucket has refilled, no parked job
has aged, and the pause has exactly an hour left. Every bucket is either taken from once
(its stored tokens exact) or refills within a microsecond (back to full before each take),
so what Redis holds is the same on every run. To accept an intended change of the output,
run this file with ``QRL_WRITE_GOLDEN=1`` and review the diff of ``tests/golden/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from queue_ratelimit import FairScheduler, Limit, Limiter
from queue_ratelimit._counters import flush_counters
from queue_ratelimit._durability import EvictionStatus
from queue_ratelimit.metrics import RateLimitCollector, snapshot

GOLDEN = Path(__file__).parent / "golden"
HOUR = 3600.0
DAY = 86400.0
# Refills a whole burst in a microsecond: back to full before each take, whatever the timing.
FAST = 1e9
# The sum of the denied waits depends on when each denial came: pinned to this (us).
WAIT_SUM_US = "7200000123"


def build_namespace(limiter: Limiter) -> int:
    """Configure and use ``limiter``'s namespace; returns the pause's end (Redis ms)."""
    pause = limiter.pause("queue:paused", 60)
    limiter.set_limit("global", Limit(FAST, burst=1000))
    limiter.set_limit("queue:emails", Limit(FAST, burst=50))
    limiter.set_limit("queue:bulk", Limit(1, per=HOUR), shadow=True)
    limiter.set_limit("tenant:*", Limit(1, per=HOUR))
    limiter.set_limit("tenant:*:queue:reports", Limit(1, per=HOUR))
    limiter.set_limit("tenant:acme", [Limit(FAST, burst=10), Limit(5, per=DAY)])
    limiter.set_limit("tenant:beta", Limit(FAST, burst=3, credit=7))
    limiter.set_limit("tenant:gamma", Limit(1, per=HOUR, credit=2))
    limiter.set_concurrency("queue:emails", 3)
    limiter.set_concurrency("tenant:acme", 1)
    limiter.set_exempt("vip", "tenant")

    def acquire(tenant: str, queue: str | None = None, priority: str | None = None) -> None:
        limiter.acquire(tenant, queue=queue, priority=priority)

    acquire("acme", "emails", "high")  # takes acme's one slot and one of emails' three
    acquire("acme", "emails", "high")  # denied by acme's cap
    for _ in range(3):
        acquire("beta", "fast", "low")  # a full bucket with a full bank each time
    # A slow bucket with credit: its token and one of its bank's two, then a denial.
    limiter.acquire("gamma", priority="high", cost=2)
    limiter.acquire("gamma", cost=2)
    for tenant in ("t1", "t2", "t3"):
        acquire(tenant, "reports")  # a tenant bucket and a tenant-queue default
        acquire(tenant, "reports", "low")  # denied: both buckets are empty
    acquire("t1", "bulk")  # denied by tenant:*
    # Would be denied by the shadow limit (more than its burst), on its first take.
    limiter.acquire("beta", queue="bulk", cost=2)
    acquire("t6", "paused")  # denied by the pause
    for _ in range(2):
        acquire("vip", "emails", "high")  # exempt from tenant:*: two emails slots
    acquire("vip", "emails", "high")  # emails' cap is full
    scheduler = FairScheduler(limiter)
    for i, (tenant, queue) in enumerate(
        [("acme", "reports"), ("acme", "reports"), ("beta", "reports"), ("t7", "fast")]
    ):
        scheduler.submit(tenant, f"job{i}", queue=queue, priority="high" if i % 2 else "low")
    flush_counters(limiter)
    limiter.client.hset(limiter.keys.shared, "h:us", WAIT_SUM_US)
    return pause.until_ms


def pinned_reader(redis_url: str, namespace: str, at_ms: int) -> Limiter:
    """A limiter whose client reads Redis's clock as ``at_ms``, on a server that evicts
    nothing (whatever the one the suite runs on does)."""
    client = redis.Redis.from_url(redis_url)
    seconds, ms = divmod(at_ms, 1000)
    client.set_response_callback("TIME", lambda response, **options: (seconds, ms * 1000))
    reader = Limiter(client, namespace=namespace)
    reader.eviction_status = lambda: EvictionStatus("noeviction", 0)  # type: ignore[method-assign]
    return reader


def exposition(limiter: Limiter) -> str:
    """The /metrics text, less the scrape's own duration (the one sample that is a timing)."""
    registry = CollectorRegistry()
    registry.register(RateLimitCollector(limiter))
    lines = generate_latest(registry).decode().splitlines(keepends=True)
    return "".join(x for x in lines if not x.startswith("queue_ratelimit_scrape_duration_"))


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("QRL_WRITE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


@pytest.fixture
def reader(limiter: Limiter, redis_url: str, namespace: str) -> Any:
    until_ms = build_namespace(limiter)
    pinned = pinned_reader(redis_url, namespace, until_ms - int(HOUR * 1000))
    yield pinned, until_ms
    pinned.client.close()


def test_the_exposition_is_the_golden_one(reader: tuple[Limiter, int], namespace: str) -> None:
    check_golden("metrics.txt", exposition(reader[0]).replace(namespace, "NS"))


def test_the_snapshot_is_the_golden_one(reader: tuple[Limiter, int], namespace: str) -> None:
    pinned, until_ms = reader
    snap = snapshot(pinned)
    # (The two times in it are the run's own: checked here, then written as names.)
    assert snap["at_ms"] == until_ms - HOUR * 1000
    assert snap["pauses"]["queue:paused"]["until_ms"] == until_ms
    snap["at_ms"], snap["pauses"]["queue:paused"]["until_ms"] = "AT", "UNTIL"
    check_golden("snapshot.json", json.dumps(snap, indent=1).replace(namespace, "NS") + "\n")
