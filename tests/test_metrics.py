"""What one-off names cost: the shared hash and the metrics series stay bounded (#11 finding 12)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from queue_ratelimit import FairScheduler, Limiter
from queue_ratelimit.metrics import (
    MAX_PRIORITY_COUNTERS,
    MAX_PRIORITY_SERIES,
    MAX_QUEUE_COUNTERS,
    MAX_QUEUE_SERIES,
    OTHER,
    RateLimitCollector,
    snapshot,
)

NAMES = 1200  # more than any cap below


def series(limiter: Limiter, family: str, **caps: int) -> dict[str, float]:
    """One family of the Prometheus text, by its last label's value."""
    registry = CollectorRegistry()
    registry.register(RateLimitCollector(limiter, **caps))
    found = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(f"{family}{{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.rsplit('="', 1)[1].rstrip('"}')] = float(value)
    return found


def test_one_off_queue_and_priority_names_stay_bounded(limiter: Limiter) -> None:
    """1,000 one-off names once added 2,004 fields to the shared hash (which never expires)
    and 2,024 series to /metrics."""
    for _ in range(3):
        limiter.acquire("steady", queue="emails", priority="high")
    for i in range(NAMES):
        assert limiter.acquire(f"t{i}", queue=f"q{i}", priority=f"p{i}").allowed
    shared = {k.decode(): v for k, v in limiter.client.hgetall(limiter.keys.shared).items()}
    queue_fields = [f for f in shared if f.startswith("a:q:")]
    priority_fields = [f for f in shared if f.startswith("a:p:")]
    assert len(queue_fields) == MAX_QUEUE_COUNTERS + 1  # and a:q:~, the rest
    assert len(priority_fields) == MAX_PRIORITY_COUNTERS + 1
    assert len(shared) < MAX_QUEUE_COUNTERS + MAX_PRIORITY_COUNTERS + 40

    snap = snapshot(limiter)
    assert snap["totals"]["allowed"] == NAMES + 3  # nothing lost in the folding
    by_queue, by_priority = snap["allowed_by_queue"], snap["allowed_by_priority"]
    assert len(by_queue) == MAX_QUEUE_SERIES + 1
    assert by_queue["emails"] == 3  # the busiest come first
    assert sum(by_queue.values()) == NAMES + 3
    assert by_queue[OTHER] == NAMES - (MAX_QUEUE_SERIES - 1)
    assert len(by_priority) == MAX_PRIORITY_SERIES + 1
    assert sum(by_priority.values()) == NAMES + 3

    queues = series(limiter, "queue_ratelimit_queue_admissions_total")
    assert len(queues) == MAX_QUEUE_SERIES + 1
    assert queues["emails"] == 3
    priorities = series(limiter, "queue_ratelimit_priority_admissions_total")
    assert len(priorities) == MAX_PRIORITY_SERIES + 1
    assert sum(priorities.values()) == NAMES + 3

    few = series(limiter, "queue_ratelimit_queue_admissions_total", max_queues=2)
    assert few["emails"] == 3
    assert len(few) == 3
    assert sum(few.values()) == NAMES + 3


def test_one_off_lanes_are_reported_within_the_cap(limiter: Limiter) -> None:
    scheduler = FairScheduler(limiter)
    for i in range(3):
        scheduler.submit("acme", f"big-{i}", queue="big")
    for i in range(40):
        scheduler.submit("acme", f"one-{i}", queue=f"lane{i}")
    lanes = snapshot(limiter, max_queues=5)["lanes"]
    assert sorted(lanes) == sorted([OTHER, "big", "lane0", "lane1", "lane10", "lane11"])
    assert lanes["big"]["backlog"] == 3
    assert lanes[OTHER]["backlog"] == 36
    backlog = series(limiter, "queue_ratelimit_queue_parked_jobs", max_queues=5)
    assert len(backlog) == 6
    assert sum(backlog.values()) == 43
