"""Producer hints (``FairScheduler.hint``, lua/hint.lua) with hostile inputs: costs at the
float edges, huge counts of jobs ahead, names and ids that are not ours, the ``count``
switch misspelt, the transit set's bounds. Probed in docs/reliability.md, "Probed in session 7,
second round"."""

from __future__ import annotations

import math

import pytest

from queue_ratelimit import ConfigError, FairScheduler, InvalidCost, InvalidName, Limit, Limiter
from queue_ratelimit._core import MAX_WAIT


@pytest.fixture
def scheduler(limiter: Limiter) -> FairScheduler:
    return FairScheduler(limiter)


@pytest.mark.parametrize(
    "count", ["sometimes", "IF_ALLOWED", "if-allowed", "", None, True, ["always"]]
)
def test_a_misspelt_count_is_refused_before_anything_is_counted(
    scheduler: FairScheduler, count: object
) -> None:
    """Anything but ``"if_allowed"`` counted the job as in transit whatever the verdict:
    a producer meaning to refuse what would wait had each refused job stand in its
    tenant's way until it lapsed (twice the predicted wait later)."""
    scheduler.limiter.set_limit("tenant:*", Limit(1, per=3600, burst=1))
    scheduler.hint("acme", item_id="first", count="always")  # takes the only token's place
    with pytest.raises(ConfigError, match="count must be"):
        scheduler.hint("acme", item_id="refused", count=count)  # type: ignore[arg-type]
    assert scheduler.hint("acme").backlog == 1  # the first alone is ahead


@pytest.mark.parametrize(
    "cost",
    [5e-324, 1e-7, math.nan, math.inf, -1.0, 0, True, "1", 10**400, 1e12 + 1, 2**53 + 1],
)
def test_costs_outside_the_bounds_are_refused(scheduler: FairScheduler, cost: object) -> None:
    with pytest.raises(InvalidCost):
        scheduler.hint("acme", cost=cost)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tenant", "queue", "item_id"),
    [
        (":total", "default", None),  # the lane's own count field
        ("acme", ":total", None),
        ("tenant:*", "default", None),
        ("a" * 129, "default", None),
        ("acme", "default", "\x1b[2J"),
        ("acme", "default", "x" * 1_000_000),
        ("acme", "default", ""),
    ],
)
def test_names_and_ids_that_are_not_ours_are_refused(
    scheduler: FairScheduler, tenant: str, queue: str, item_id: str | None
) -> None:
    with pytest.raises(InvalidName):
        scheduler.hint(tenant, queue=queue, item_id=item_id)


def test_the_largest_cost_behind_many_jobs_waits_at_most_the_longest_wait(
    scheduler: FairScheduler,
) -> None:
    """50,000 jobs in transit ahead at the largest cost on a very slow limit: the wait is
    the longest a decision reports (``MAX_WAIT``), never inf or NaN, and the hint answers."""
    limiter = scheduler.limiter
    limiter.set_limit("tenant:*", Limit(1e-6, per=1, burst=1))
    transit = scheduler.keys.transit("default", "acme")
    far = 2**45  # ms, long after now
    for start in range(0, 50_000, 10_000):
        limiter.client.zadd(transit, {f"j{i}": far for i in range(start, start + 10_000)})
    hint = scheduler.hint("acme", cost=1e12)
    assert not hint.allowed
    assert hint.backlog == 50_000
    assert hint.wait_ms == MAX_WAIT * 1000
    # (Each job ahead is taken to cost what this one does, lua/hint.lua: 50,001 jobs of
    # 1e-6 fit the one token there is, so the cheapest is told it starts at once.)
    smallest = scheduler.hint("acme", cost=1e-6)
    assert (smallest.allowed, smallest.wait_ms) == (True, 0.0)


def server_ms(limiter: Limiter) -> int:
    seconds, micros = limiter.client.time()
    return seconds * 1000 + micros // 1000


def test_a_job_in_transit_stops_counting_within_seven_days(scheduler: FairScheduler) -> None:
    """On a limit of one job every 115 days the predicted wait is months, and an entry of a
    job that never arrives (a purged broker queue) stayed counted for twice that."""
    limiter = scheduler.limiter
    limiter.set_limit("tenant:*", Limit(1, per=115 * 86400, burst=1))
    scheduler.hint("acme", item_id="first", count="always")
    before = server_ms(limiter)
    hint = scheduler.hint("acme", item_id="second", count="always")
    assert hint.wait_ms > 30 * 86400 * 1000  # (months: far past the bound)
    lapses = limiter.client.zscore(scheduler.keys.transit("default", "acme"), "second")
    assert lapses is not None
    assert lapses <= server_ms(limiter) + 7 * 86400 * 1000 + 1  # (rounded up to a ms)
    assert lapses >= before + 7 * 86400 * 1000 - 1000


def test_a_tenants_transit_set_keeps_at_most_100000_jobs_the_soonest_to_lapse_going_first(
    scheduler: FairScheduler,
) -> None:
    limiter = scheduler.limiter
    limiter.set_limit("tenant:*", Limit(1, per=3600, burst=1))
    transit = scheduler.keys.transit("default", "acme")
    soon = server_ms(limiter) + 60_000  # each lapses sooner than the hinted job below
    for start in range(0, 100_000, 10_000):
        limiter.client.zadd(transit, {f"j{i}": soon + i for i in range(start, start + 10_000)})
    scheduler.hint("acme", item_id="new", count="always")
    assert limiter.client.zcard(transit) == 100_000
    assert limiter.client.zscore(transit, "new") is not None
    assert limiter.client.zscore(transit, "j0") is None  # (the soonest to lapse went)
    assert limiter.client.zscore(transit, "j1") is not None
