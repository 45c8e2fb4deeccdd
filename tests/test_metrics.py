"""The metrics: what one-off names cost (the shared hash and the series stay bounded, #11
finding 12), denials by deciding scope and by tenant, Prometheus conventions, the cost of
a scrape, and a Redis that is away (#12)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import NO_RETRY, free_port
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.scrape import count_requests
from queue_ratelimit import FairScheduler, Limit, Limiter
from queue_ratelimit._counters import flush_counters
from queue_ratelimit._shards import ShardedLimiter
from queue_ratelimit.metrics import (
    MAX_PAUSE_SERIES,
    MAX_PRIORITY_COUNTERS,
    MAX_PRIORITY_SERIES,
    MAX_QUEUE_COUNTERS,
    MAX_QUEUE_SERIES,
    MAX_TENANT_COUNTERS,
    OTHER,
    RateLimitCollector,
    snapshot,
)

NAMES = 1200  # more than any cap below
HOUR = 3600.0


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
    # (Each priority given a weight: one nobody configured is counted as normal.)
    weights = FairScheduler(limiter)
    for i in range(NAMES):
        weights.set_priority_weight(f"p{i}", 1)
    for i in range(NAMES):
        assert limiter.acquire(f"t{i}", queue=f"q{i}", priority=f"p{i}").allowed
    flush_counters(limiter)  # (the bound holds where the counts are written)
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


def test_one_off_pauses_are_counted_and_the_series_stay_bounded(limiter: Limiter) -> None:
    """A task pauses its own tenant on a 429 (pause_and_retry): 100,000 one-off tenants
    made 100,000 series of pause_remaining_seconds (10.6 MB a scrape) and a 7.6 MB
    snapshot. Now the pauses ending last are shown, and all of them counted."""
    count = MAX_PAUSE_SERIES + 50
    for i in range(count):
        limiter.pause(f"tenant:t{i}", 600 + i)  # t50... end last
    snap = snapshot(limiter)
    assert snap["paused_scopes"] == count
    assert set(snap["pauses"]) == {f"tenant:t{i}" for i in range(50, count)}
    remaining = series(limiter, "queue_ratelimit_pause_remaining_seconds")
    assert set(remaining) == set(snap["pauses"])
    assert samples(limiter)["queue_ratelimit_paused_scopes"] == {(): count}


def test_a_sharded_namespace_is_scraped_with_its_pauses(sharded: ShardedLimiter) -> None:
    """The sharded snapshot had no "pauses": every scrape of a namespace with shards
    raised KeyError in the collector (the admin API's /metrics answered 500)."""
    sharded.set_limit("tenant:*", Limit(10))
    sharded.acquire("a")
    sharded.pause("tenant:b", 60)
    assert set(series(sharded, "queue_ratelimit_pause_remaining_seconds")) == {"tenant:b"}
    assert samples(sharded)["queue_ratelimit_paused_scopes"] == {(): 1}
    assert snapshot(sharded)["pauses"]["tenant:b"]["remaining_s"] > 59


# -- #12: denials by deciding scope, per tenant, Prometheus conventions --------------------


def samples(limiter: Limiter, **caps: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample on /metrics, by sample name, then by its labels (less the namespace)."""
    registry = CollectorRegistry()
    registry.register(RateLimitCollector(limiter, **caps))
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "namespace"))
            out.setdefault(s.name, {})[labels] = s.value
    return out


def test_denials_by_tenant_scopes_are_counted_under_the_scope_that_decided(
    limiter: Limiter,
) -> None:
    """Denials by a tenant scope had no sample at all, and tenants under the tenant:*
    default appeared nowhere one by one."""
    limiter.set_limit("tenant:*", Limit(1, per=HOUR))
    limiter.set_limit("tenant:vip", Limit(2, per=HOUR))
    limiter.set_limit("tenant:*:queue:emails", Limit(1, per=HOUR))
    for tenant, tries in (("a", 4), ("b", 2), ("vip", 3)):
        for _ in range(tries):
            limiter.acquire(tenant)
    for _ in range(3):
        limiter.acquire("c", queue="emails")
    found = samples(limiter)
    by_scope = found["queue_ratelimit_scope_decisions_total"]
    assert by_scope == {
        (("outcome", "denied"), ("scope", "tenant:*")): 3 + 1,
        (("outcome", "denied"), ("scope", "tenant:vip")): 1,
        (("outcome", "denied"), ("scope", "tenant:*:queue:emails")): 2,
    }
    assert found["queue_ratelimit_tenant_denials_total"] == {
        (("tenant", "a"),): 3,
        (("tenant", "b"),): 1,
        (("tenant", "c"),): 2,
        (("tenant", "vip"),): 1,
    }


def test_tenant_series_are_the_most_denied_and_the_rest_under_other(limiter: Limiter) -> None:
    limiter.set_limit("tenant:*", Limit(1, per=HOUR))
    for i in range(12):
        for _ in range(i + 2):  # tenant t<i>: i + 1 denials
            limiter.acquire(f"t{i:02}")
    total = sum(i + 1 for i in range(12))
    denials = samples(limiter, max_tenants=3)["queue_ratelimit_tenant_denials_total"]
    assert denials == {
        (("tenant", "t09"),): 10,
        (("tenant", "t10"),): 11,
        (("tenant", "t11"),): 12,
        (("tenant", OTHER),): total - 33,
    }
    snap = snapshot(limiter, max_tenants=3)
    assert sorted(snap["tenants"]) == ["t09", "t10", "t11"]  # the most throttled, shown
    assert snap["buckets"]["tenant:t11"]["limit"] == "tenant:*"


def test_the_tenant_denials_kept_in_redis_are_bounded(limiter: Limiter) -> None:
    """One-off tenants cannot grow the denials zset past MAX_TENANT_COUNTERS; a tenant that
    keeps being denied stays in it, and the totals stay exact."""
    limiter.set_limit("global", Limit(1, per=HOUR))
    limiter.acquire("first")  # takes the one token: every call below is denied
    for i in range(MAX_TENANT_COUNTERS + 300):
        limiter.acquire(f"once{i}")
        if i % 50 == 0:
            limiter.acquire("noisy")
    key = limiter.keys.tenant_denials
    assert limiter.client.zcard(key) <= MAX_TENANT_COUNTERS
    noisy = limiter.client.zscore(key, "noisy")
    assert noisy is not None
    assert noisy > 50
    snap = snapshot(limiter, max_tenants=5)
    assert "noisy" in snap["tenant_denials"]
    total = MAX_TENANT_COUNTERS + 300 + (MAX_TENANT_COUNTERS + 300 + 49) // 50
    assert sum(snap["tenant_denials"].values()) == snap["totals"]["denied"] == total


def test_prometheus_conventions(limiter: Limiter) -> None:
    """Base units (seconds, not ms), counters ending in _total, fill as a ratio, and a help
    text for every family."""
    limiter.set_limit("tenant:*", Limit(1, per=HOUR))
    limiter.acquire("a")
    limiter.acquire("a")
    registry = CollectorRegistry()
    registry.register(RateLimitCollector(limiter))
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    names = {f.name: f for f in families}
    for family in families:
        assert family.name.startswith("queue_ratelimit_")
        assert "_ms" not in family.name, family.name
        assert len(family.documentation) > 25, family.name
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {f"{family.name}_total"}
    wait = names["queue_ratelimit_denied_wait_seconds"]
    assert wait.type == "histogram"
    bounds = [s.labels["le"] for s in wait.samples if s.name.endswith("_bucket")]
    assert bounds[:2] == ["0.001", "0.005"]
    assert bounds[-1] == "+Inf"
    (wait_sum,) = [s.value for s in wait.samples if s.name.endswith("_sum")]
    assert 3000 < wait_sum < 3700  # one wait of about an hour, in seconds
    assert names["queue_ratelimit_bucket_fill_ratio"].type == "gauge"
    assert names["queue_ratelimit_oldest_parked_age_seconds"].type == "gauge"
    assert names["queue_ratelimit_scrape_duration_seconds"].type == "gauge"


def test_a_scrape_costs_the_same_round_trips_for_3_or_60_queues(limiter: Limiter) -> None:
    """Each lane's tenants were read with an HGETALL of its own (N+1 round trips)."""
    scheduler = FairScheduler(limiter)

    def scrape_cost(lanes: int) -> int:
        for i in range(lanes):
            for tenant in ("acme", "beta"):
                scheduler.submit(tenant, f"{tenant}-{lanes}-{i}", queue=f"q{i}")
        with count_requests() as requests:
            samples(limiter)
        return requests.count

    few = scrape_cost(3)
    assert few <= 5
    assert scrape_cost(60) == few
    snap = snapshot(limiter)
    assert snap["tenant_backlog"] == {"acme": 63, "beta": 63}
    assert snap["totals"]["parked"] == 126


def test_a_lane_too_large_to_read_whole_still_counts_the_tenants_shown(
    limiter: Limiter,
) -> None:
    scheduler = FairScheduler(limiter)
    limiter.set_limit("tenant:acme", "100/s")  # configured: shown whatever its backlog
    for i in range(3):
        scheduler.submit("acme", f"acme-{i}", queue="big")
    for i in range(12):
        scheduler.submit(f"t{i}", f"one-{i}", queue="big")
    snap = snapshot(limiter, max_tenants=4)
    assert snap["tenants"]["acme"]["backlog"] == 3
    assert snap["tenant_backlog"]["acme"] == 3
    assert snap["tenant_backlog"][OTHER] == 12
    assert snap["lanes"]["big"]["backlog"] == 15


def test_the_buckets_shown_are_every_configured_scope_and_the_defaults_in_use(
    limiter: Limiter,
) -> None:
    limiter.set_limit("global", Limit(100, per=HOUR))
    limiter.set_limit("queue:emails", Limit(50, per=HOUR))
    limiter.set_limit("tenant:*", Limit(1, per=HOUR))
    limiter.set_limit("tenant:*:queue:emails", Limit(1, per=HOUR))
    limiter.set_limit("tenant:acme:queue:reports", Limit(5, per=HOUR))
    limiter.set_exempt("vip", "tenant")
    for tenant, queue in (("acme", "reports"), ("beta", "emails"), ("beta", "emails")):
        limiter.acquire(tenant, queue=queue)
    limiter.acquire("vip", queue="emails")
    snap = snapshot(limiter)
    assert {scope: b["limit"] for scope, b in snap["buckets"].items()} == {
        "global": "global",
        "queue:emails": "queue:emails",
        "tenant:acme": "tenant:*",
        "tenant:acme:queue:reports": "tenant:acme:queue:reports",
        "tenant:beta": "tenant:*",
        "tenant:beta:queue:emails": "tenant:*:queue:emails",
    }
    assert snap["buckets"]["tenant:acme:queue:reports"]["tokens"] == pytest.approx(4, abs=0.01)
    assert snap["exemptions"] == {"vip": "tenant"}
    assert snap["tenants"]["vip"]["exempt"] == "tenant"  # shown, without a bucket


def test_an_unreachable_redis_is_a_sample_not_a_failed_scrape(namespace: str) -> None:
    dead = Limiter(redis.Redis(port=free_port(), retry=NO_RETRY), namespace=namespace)
    found = samples(dead)
    assert found["queue_ratelimit_up"] == {(): 0}
    assert set(found) == {"queue_ratelimit_up", "queue_ratelimit_scrape_duration_seconds"}


def test_fail_mode_decisions_reach_the_metrics_once_redis_is_back(
    redis_process: Callable[..., Any], namespace: str
) -> None:
    server = redis_process()
    client = redis.Redis.from_url(server.url, retry=NO_RETRY, socket_timeout=2)
    opened = Limiter(client, namespace=namespace, fail_mode="open")
    closed = Limiter(client, namespace=namespace, fail_mode="closed")
    assert opened.acquire("acme").allowed
    server.stop()
    assert all(opened.acquire("acme").degraded for _ in range(3))
    assert not closed.acquire("acme").allowed
    assert samples(opened)["queue_ratelimit_up"] == {(): 0}
    redis_process(port=server.port)
    assert not opened.acquire("acme").degraded  # the first decision adds the counts
    assert not closed.acquire("acme").degraded
    found = samples(opened)
    assert found["queue_ratelimit_up"] == {(): 1}
    assert found["queue_ratelimit_fail_mode_events_total"] == {
        (("mode", "open"),): 3,
        (("mode", "closed"),): 1,
        (("mode", "raise"),): 0,
    }
    assert opened._core.fail_mode_pending == {}
