"""Tests for ``FairScheduler``: weighted-fair order, caps, leases and cleanup, on a real Redis."""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence

import pytest
import redis
from conftest import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queue_ratelimit import (
    BacklogFull,
    ConfigError,
    Dispatch,
    DispatchedItem,
    FairScheduler,
    InvalidCost,
    InvalidName,
    InvalidWeight,
    Limit,
    Limiter,
)
from queue_ratelimit._counters import flush_counters
from queue_ratelimit._scheduler import MAX_WEIGHT, MIN_WEIGHT, HeldBack, SubmitItem

# A rate so slow that no token comes back while a test runs: the burst is the whole budget.
HOURLY = 3600.0


def budget(tokens: float) -> Limit:
    """A cap that admits exactly ``tokens`` during a test and then binds."""
    return Limit(1, per=HOURLY, burst=tokens)


def key(scheduler: FairScheduler, kind: str, *parts: str) -> str:
    """The full name of a scheduler key (``KeySpace`` kinds: "inflight", "backlog"...)."""
    return scheduler.keys.name(kind, *parts)


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def submit_many(
    scheduler: FairScheduler,
    items: Iterable[tuple[str, str, str, str]],
    *,
    cost: float = 1,
    chunk: int = 2000,
) -> int:
    """Submit (tenant, id, queue, priority) items through one pipeline per ``chunk``.

    Goes through the same script as ``submit`` (so the same code path), minus a round trip
    per item. Returns the number of items queued; fails on any duplicate or error.
    """
    queued = 0
    pipe = scheduler.client.pipeline(transaction=False)
    pending = 0

    def flush() -> int:
        replies = pipe.execute()
        assert replies == [1] * len(replies), replies
        return len(replies)

    for tenant, item_id, queue, priority in items:
        scheduler.submit(
            tenant, item_id, queue=queue, priority=priority, cost=float(cost), pipeline=pipe
        )
        pending += 1
        if pending == chunk:
            queued += flush()
            pending = 0
    if pending:
        queued += flush()
    return queued


def backlogged(
    scheduler: FairScheduler,
    tenant: str,
    count: int,
    *,
    priority: str = "normal",
    queue: str = "default",
) -> list[str]:
    """Queue ``count`` items for one class; their ids say where they came from."""
    ids = [f"{queue}.{tenant}.{priority}.{i}" for i in range(count)]
    submit_many(scheduler, ((tenant, i, queue, priority) for i in ids))
    return ids


def take(
    scheduler: FairScheduler,
    count: int,
    *,
    queues: Sequence[str] = ("default",),
    batch: int = 50,
) -> list[DispatchedItem]:
    """Dispatch exactly ``count`` items, failing if the scheduler ever has nothing to give."""
    items: list[DispatchedItem] = []
    while len(items) < count:
        result = scheduler.dispatch(queues, max_items=min(batch, count - len(items)))
        assert result.items, f"nothing dispatched after {len(items)} items: {result}"
        items.extend(result.items)
    return items


def shares(items: Iterable[DispatchedItem], attr: str = "tenant") -> Counter[str]:
    return Counter(getattr(item, attr) for item in items)


def redis_ms(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds * 1000 + micros / 1000)


def run_out(scheduler: FairScheduler, client: redis.Redis, count: int) -> None:
    """Make the ``count`` leases in flight run out now, as if their worker had died a
    moment ago while Redis was being called: every deadline moves back by the same amount
    (their order stays), the latest to a millisecond ago. Waiting for them instead would be
    a silence in the calls (buckets.lua, "Silences"): they would get a grace."""
    inflight = key(scheduler, "inflight")
    deadlines = client.zrange(inflight, 0, -1, withscores=True)
    assert len(deadlines) == count, deadlines
    shift = deadlines[-1][1] - (redis_ms(client) - 1)
    client.zadd(inflight, {member: deadline - shift for member, deadline in deadlines})


def reap_all(scheduler: FairScheduler, client: redis.Redis, count: int) -> int:
    """Make the ``count`` leases in flight run out (``run_out``), then reap until done."""
    run_out(scheduler, client, count)
    reaped = 0
    while n := scheduler.reap():
        reaped += n
    return reaped


@pytest.fixture
def scheduler(limiter: Limiter) -> FairScheduler:
    return FairScheduler(limiter)


# -- priorities ----------------------------------------------------------------------------


def test_priority_ratio_is_three_to_one_under_a_binding_cap(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("global", budget(400))
    backlogged(scheduler, "acme", 500, priority="high")
    backlogged(scheduler, "acme", 500, priority="low")

    items = take(scheduler, 400)

    counts = shares(items, "priority")
    assert abs(counts["high"] - 300) <= 2
    assert abs(counts["low"] - 100) <= 2
    # Stride scheduling is smooth, not just right on average: every prefix is close to 3:1.
    high = 0
    for n, item in enumerate(items, start=1):
        high += item.priority == "high"
        assert abs(high - 0.75 * n) <= 2, f"after {n} dispatches {high} were high"
    # The cap binds: the next dispatch admits nothing and says how long to wait.
    denied = scheduler.dispatch(["default"])
    assert denied.items == ()
    assert denied.wait_ms is not None
    assert denied.wait_ms > 0


def test_default_priority_weights_share_three_two_one(scheduler: FairScheduler) -> None:
    for priority in ("high", "normal", "low"):
        backlogged(scheduler, "acme", 400, priority=priority)

    counts = shares(take(scheduler, 600), "priority")

    assert abs(counts["high"] - 300) <= 2
    assert abs(counts["normal"] - 200) <= 2
    assert abs(counts["low"] - 100) <= 2


def test_each_backlog_is_fifo(scheduler: FairScheduler) -> None:
    high = backlogged(scheduler, "acme", 30, priority="high")
    low = backlogged(scheduler, "acme", 30, priority="low")

    items = take(scheduler, 40)

    assert [i.id for i in items if i.priority == "high"] == high[:30]
    assert [i.id for i in items if i.priority == "low"] == low[:10]


# -- tenants -------------------------------------------------------------------------------


def test_premium_tenant_gets_five_times_a_standard_share(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    scheduler.set_tenant_weight("premium", 5)
    limiter.set_limit("global", budget(900))
    for tenant in ("premium", "s1", "s2", "s3", "s4"):
        backlogged(scheduler, tenant, 600)

    counts = shares(take(scheduler, 900))

    assert abs(counts["premium"] - 500) <= 2
    for tenant in ("s1", "s2", "s3", "s4"):
        assert abs(counts[tenant] - 100) <= 2


def test_marking_everything_high_gains_nothing_against_other_tenants(
    scheduler: FairScheduler,
) -> None:
    backlogged(scheduler, "shouty", 300, priority="high")
    backlogged(scheduler, "polite", 300, priority="normal")
    backlogged(scheduler, "mixed", 300, priority="high")
    backlogged(scheduler, "mixed", 300, priority="low")

    items = take(scheduler, 300)

    counts = shares(items)
    for tenant in ("shouty", "polite", "mixed"):
        assert abs(counts[tenant] - 100) <= 1
    # Inside a tenant the priorities still share by weight.
    inside = shares((i for i in items if i.tenant == "mixed"), "priority")
    assert abs(inside["high"] - 75) <= 2


def test_default_tenant_weight_applies_to_tenants_without_their_own(
    scheduler: FairScheduler,
) -> None:
    scheduler.set_tenant_weight("*", 2)
    scheduler.set_tenant_weight("small", 1)
    backlogged(scheduler, "big", 200)
    backlogged(scheduler, "small", 200)

    counts = shares(take(scheduler, 150))

    assert abs(counts["big"] - 100) <= 2
    assert abs(counts["small"] - 50) <= 2


def test_shares_are_counted_in_tokens_not_items(scheduler: FairScheduler) -> None:
    submit_many(scheduler, (("heavy", f"h{i}", "default", "normal") for i in range(50)), cost=3)
    backlogged(scheduler, "light", 100)

    counts = shares(take(scheduler, 40))

    # 3 tokens per heavy item, 1 per light one: equal tokens means 1 heavy item per 3 light.
    assert abs(counts["heavy"] - 10) <= 1
    assert abs(counts["light"] - 30) <= 1


def test_a_flooding_tenant_cannot_push_others_below_their_share(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("global", budget(500))
    tenants = [f"t{i:02d}" for i in range(50)]
    for tenant in tenants:
        backlogged(scheduler, tenant, 200 if tenant == "t07" else 20)

    counts = shares(take(scheduler, 500))

    assert all(abs(counts[t] - 10) <= 1 for t in tenants), counts


def test_a_quiet_tenant_is_not_stuck_behind_a_noisy_backlog(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("global", budget(200))
    backlogged(scheduler, "noisy", 1000)
    take(scheduler, 100)

    scheduler.submit("quiet", "urgent")
    next_two = take(scheduler, 2, batch=1)

    assert "urgent" in [i.id for i in next_two]


# -- work conservation and joining ---------------------------------------------------------


def test_a_lone_low_priority_class_gets_everything(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("global", budget(100))
    backlogged(scheduler, "acme", 150, priority="low")

    items = take(scheduler, 100, batch=100)

    assert len(items) == 100
    assert {i.priority for i in items} == {"low"}


def test_an_idle_class_share_goes_to_the_others(scheduler: FairScheduler) -> None:
    backlogged(scheduler, "a", 100)
    backlogged(scheduler, "b", 100)
    backlogged(scheduler, "c", 100, priority="normal")
    backlogged(scheduler, "c", 100, priority="low")
    # c has no "high" work: its normal and low share c's third of the budget 2:1.

    items = take(scheduler, 150)

    counts = shares(items)
    assert [counts[t] for t in "abc"] == [50, 50, 50]
    inside = shares((i for i in items if i.tenant == "c"), "priority")
    assert abs(inside["normal"] - 33) <= 1
    assert abs(inside["low"] - 17) <= 1


def test_a_new_tenant_joins_at_the_current_virtual_time(scheduler: FairScheduler) -> None:
    backlogged(scheduler, "a", 1100)
    take(scheduler, 1000, batch=200)
    backlogged(scheduler, "b", 100)

    counts = shares(take(scheduler, 20, batch=1))

    # No catch-up burst for the 1000 dispatches b was not there for: it gets half from now.
    assert 9 <= counts["b"] <= 11


def test_a_new_priority_joins_at_the_tenant_virtual_time(scheduler: FairScheduler) -> None:
    backlogged(scheduler, "acme", 200, priority="low")
    take(scheduler, 100)
    backlogged(scheduler, "acme", 100, priority="high")

    counts = shares(take(scheduler, 40, batch=1), "priority")

    # 3:1 from here on (plus at most one low quantum of head start), not all 40.
    assert 29 <= counts["high"] <= 33


def test_leaving_and_rejoining_gains_nothing(scheduler: FairScheduler) -> None:
    backlogged(scheduler, "steady", 200)
    scheduler.submit("bursty", "bursty-0")
    served = 0
    for _ in range(100):
        (item,) = scheduler.dispatch(["default"]).items
        if item.tenant == "bursty":
            served += 1
            # The backlog empties with every dispatch; the next item arrives right away.
            assert scheduler.submit("bursty", f"bursty-{served}")
        scheduler.ack(item.id)

    assert 49 <= served <= 51


def test_a_priority_that_comes_and_goes_gets_no_more_than_its_weight(
    scheduler: FairScheduler,
) -> None:
    backlogged(scheduler, "acme", 200, priority="low")
    scheduler.submit("acme", "hi-0", priority="high")
    served = 0
    for _ in range(100):
        (item,) = scheduler.dispatch(["default"]).items
        if item.priority == "high":
            served += 1
            assert scheduler.submit("acme", f"hi-{served}", priority="high")

    assert 74 <= served <= 76


def test_a_late_rejoin_banks_no_credit(scheduler: FairScheduler) -> None:
    backlogged(scheduler, "steady", 400)
    scheduler.submit("sleepy", "s-0")
    take(scheduler, 2, batch=1)  # both served once; sleepy has left
    take(scheduler, 100)  # ... and is away for 100 dispatches
    scheduler.submit("sleepy", "s-1")
    for i in range(2, 30):
        scheduler.submit("sleepy", f"s-{i}")

    counts = shares(take(scheduler, 20, batch=1))

    assert 9 <= counts["sleepy"] <= 11


# -- tenant caps and parking ---------------------------------------------------------------


def test_a_tenant_held_back_by_its_own_cap_is_parked_and_blocks_nobody(
    limiter: Limiter, scheduler: FairScheduler, redis_client: redis.Redis
) -> None:
    # 20/s with a burst of 2: after two items the tenant waits about 50 ms for a token.
    limiter.set_limit("tenant:capped", Limit(20, burst=2))
    backlogged(scheduler, "capped", 50)
    backlogged(scheduler, "free", 200)

    first = scheduler.dispatch(["default"], max_items=10)

    counts = shares(first.items)
    assert len(first.items) == 10, "a capped tenant must not hold back the others"
    assert counts["capped"] <= 3
    assert counts["free"] >= 7
    parked = redis_client.zscore(key(scheduler, "parked", "default"), "capped")
    active = redis_client.zscore(key(scheduler, "active", "default"), "capped")
    assert parked is not None
    assert active is None
    # It comes back by itself once its own tokens return, while "free" keeps being served.
    found = wait_until(
        lambda: [i for i in scheduler.dispatch(["default"]).items if i.tenant == "capped"],
        timeout=10,
        what="the capped tenant to be dispatched again",
    )
    assert found


def held(scope: str, window: str | None = None, **flags: bool) -> HeldBack:
    return HeldBack("default", "a", scope, window, **flags)


# What a dispatch held back, and the scope (and window) that did: (the limiter's method and
# its arguments, items admitted of two, the reply's held_back). A worker reports it where
# it reports its gate's parks.
TWO_WINDOWS = [Limit(100), budget(1)]
HELD_BACK_CASES = {
    "its own bucket": ("set_limit", "tenant:a", budget(1), 1, held("tenant:a")),
    "one of its windows": ("set_limit", "tenant:a", TWO_WINDOWS, 1, held("tenant:a", "1/h")),
    "its concurrency cap": (
        "set_concurrency",
        "tenant:a",
        1,
        1,
        held("tenant:a", concurrency=True),
    ),
    "a pause": ("pause", "tenant:a", 600, 0, held("tenant:a", paused=True)),
    "its priority's scope": ("set_limit", "priority:normal", budget(1), 1, held("priority:normal")),
    "the queue's cap": ("set_limit", "queue:default", TWO_WINDOWS, 1, held("queue:default", "1/h")),
    "the global cap": ("set_limit", "global", budget(1), 1, held("global")),
}


@pytest.mark.parametrize("transport", ["fcall", "evalsha"])
@pytest.mark.parametrize(
    ("method", "scope", "value", "admitted", "expected"),
    HELD_BACK_CASES.values(),
    ids=list(HELD_BACK_CASES),
)
def test_a_dispatch_says_what_it_held_back_and_why(
    limiter: Limiter,
    scheduler: FairScheduler,
    method: str,
    scope: str,
    value: object,
    admitted: int,
    expected: HeldBack,
    transport: str,
) -> None:
    limiter._scripts.transport = transport
    getattr(limiter, method)(scope, value)
    backlogged(scheduler, "a", 2)

    batch = scheduler.dispatch(["default"], max_items=5)

    assert len(batch.items) == admitted
    assert batch.held_back == (expected,)
    shown = f"{expected.denied_by} ({expected.window})" if expected.window else expected.denied_by
    assert expected.binding == shown


def test_a_parked_tenant_is_reported_once_and_others_with_it(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    """Each tenant the call judged and held back, in the order judged; a tenant parked
    until its tokens return is not judged, nor reported, again before then; a dispatch
    that holds nothing back reports nothing."""
    limiter.set_limit("tenant:*", budget(1))
    limiter.set_limit("tenant:b", [Limit(100), budget(1)])
    backlogged(scheduler, "a", 2)
    backlogged(scheduler, "b", 2)
    backlogged(scheduler, "c", 1, queue="other")

    batch = scheduler.dispatch(["default", "other"], max_items=10)

    assert shares(batch.items) == {"a": 1, "b": 1, "c": 1}
    assert sorted(batch.held_back, key=lambda h: h.tenant) == [
        HeldBack("default", "a", "tenant:a"),
        HeldBack("default", "b", "tenant:b", "1/h"),
    ]
    again = scheduler.dispatch(["default", "other"], max_items=10)
    assert (again.items, again.held_back) == ((), ())
    assert again.wait_ms is not None
    assert again.wait_ms > 0


def test_only_parked_tenants_left_reports_when_their_tokens_return(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("tenant:capped", Limit(2, burst=1))  # a token every 500 ms
    backlogged(scheduler, "capped", 5)

    assert len(scheduler.dispatch(["default"], max_items=5).items) == 1
    waiting = scheduler.dispatch(["default"])

    assert waiting.items == ()
    assert waiting.wait_ms is not None
    assert 0 < waiting.wait_ms <= 500.001
    found = wait_until(
        lambda: scheduler.dispatch(["default"]).items,
        timeout=10,
        what="the capped tenant's tokens to return",
    )
    assert found[0].tenant == "capped"


def test_many_parked_tenants_are_skipped_cheaply(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    # Every tenant may run one item an hour; "vip" is exempt from tenant caps.
    limiter.set_limit("tenant:*", budget(1))
    limiter.set_exempt("vip")
    tenants = [f"c{i:02d}" for i in range(60)]
    submit_many(scheduler, ((t, f"{t}.{n}", "default", "normal") for t in tenants for n in (0, 1)))
    backlogged(scheduler, "vip", 100)
    first_round = take(scheduler, 61, batch=61)
    assert shares(first_round) == Counter({**dict.fromkeys(tenants, 1), "vip": 1})

    # Each call may park up to max_skips tenants before it gives up (wait 0: ask again).
    calls: list[Dispatch] = []
    while not any(i.tenant == "vip" for c in calls for i in c.items):
        calls.append(scheduler.dispatch(["default"]))
        assert len(calls) <= math.ceil(60 / (scheduler.max_skips + 1)) + 1
    assert all(c.wait_ms == 0 for c in calls)
    # Parked tenants are not scanned again: from here on every call serves vip at once.
    for _ in range(20):
        (item,) = scheduler.dispatch(["default"]).items
        assert item.tenant == "vip"


# -- global and queue caps -----------------------------------------------------------------


def test_a_binding_global_cap_dispatches_nothing_and_says_how_long(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("global", Limit(1, burst=5))  # a token every second
    backlogged(scheduler, "a", 10)
    backlogged(scheduler, "b", 10)

    assert len(scheduler.dispatch(["default"], max_items=10).items) == 5
    denied = scheduler.dispatch(["default"], max_items=10)
    peek = limiter.peek("a", queue="default")

    assert denied.items == ()
    assert denied.wait_ms is not None
    assert 0 < denied.wait_ms <= 1000.001
    assert peek.denied_by == "global"
    # Both read the same bucket: the later peek can only need less time.
    assert 0 < peek.wait_ms <= denied.wait_ms


def test_a_queue_cap_binds_only_its_own_lane(limiter: Limiter, scheduler: FairScheduler) -> None:
    limiter.set_limit("queue:slow", budget(2))
    slow = backlogged(scheduler, "a", 5, queue="slow")
    fast = backlogged(scheduler, "a", 5, queue="fast")

    items = scheduler.dispatch(["slow", "fast"], max_items=10).items

    # Queues are served in the order given: slow until its cap binds, then fast.
    assert [i.id for i in items] == slow[:2] + fast
    denied = scheduler.dispatch(["slow", "fast"])
    assert denied.items == ()
    assert denied.wait_ms is not None
    assert denied.wait_ms > 1000  # the next slow token is most of an hour away


def test_multi_lane_dispatch_honours_queue_order(scheduler: FairScheduler) -> None:
    first = backlogged(scheduler, "a", 3, queue="first")
    second = backlogged(scheduler, "b", 3, queue="second")

    items = scheduler.dispatch(["second", "first"], max_items=5).items

    assert [i.id for i in items] == second + first[:2]
    assert [i.queue for i in items] == ["second"] * 3 + ["first"] * 2


def test_a_global_cap_stops_every_lane(limiter: Limiter, scheduler: FairScheduler) -> None:
    limiter.set_limit("global", budget(3))
    first = backlogged(scheduler, "a", 2, queue="first")
    second = backlogged(scheduler, "a", 5, queue="second")

    items = scheduler.dispatch(["first", "second"], max_items=10).items

    assert [i.id for i in items] == first + second[:1]
    denied = scheduler.dispatch(["first", "second"])
    assert denied.items == ()
    assert denied.wait_ms is not None
    assert denied.wait_ms > 0


def test_empty_lanes_report_no_wait(scheduler: FairScheduler) -> None:
    result = scheduler.dispatch(["nothing", "here"])

    assert result == Dispatch(items=(), wait_ms=None)


# -- batches -------------------------------------------------------------------------------


def _busy_namespace(scheduler: FairScheduler, limiter: Limiter) -> None:
    limiter.set_limit("global", budget(600))
    scheduler.set_tenant_weight("gold", 3)
    scheduler.set_priority_weight("bulk", 0.5)
    plan = [
        ("gold", "high", 80),
        ("gold", "low", 80),
        ("std", "normal", 120),
        ("std", "bulk", 60),
        ("other", "high", 40),
        ("other", "normal", 40),
        ("other", "low", 40),
        ("tiny", "low", 5),
    ]
    for tenant, priority, count in plan:
        backlogged(scheduler, tenant, count, priority=priority)
    submit_many(scheduler, (("pricey", f"p{i}", "default", "normal") for i in range(30)), cost=2)


def test_a_batch_dispatch_equals_single_dispatches(
    redis_client: redis.Redis, limiter: Limiter, scheduler: FairScheduler
) -> None:
    twin = Limiter(redis_client, namespace=f"{limiter.namespace}-twin")
    twin_scheduler = FairScheduler(twin)
    try:
        _busy_namespace(scheduler, limiter)
        _busy_namespace(twin_scheduler, twin)

        batched: list[tuple[str, str, str]] = []
        for k in (1, 7, 50, 3, 120, 200, 19):
            batched += [(i.id, i.tenant, i.priority) for i in take(scheduler, k, batch=k)]
        singles = [(i.id, i.tenant, i.priority) for i in take(twin_scheduler, 400, batch=1)]

        assert batched == singles
    finally:
        keys = list(redis_client.scan_iter(match=f"qrl:{{{twin.namespace}}}:*", count=1000))
        if keys:
            redis_client.delete(*keys)


# -- leases --------------------------------------------------------------------------------


def test_an_item_is_never_handed_out_twice_while_its_lease_is_live(
    scheduler: FairScheduler,
) -> None:
    ids = backlogged(scheduler, "a", 20)

    items = take(scheduler, 20, batch=7)

    assert sorted(i.id for i in items) == sorted(ids)
    assert scheduler.in_flight() == 20
    assert scheduler.reap() == 0
    assert scheduler.dispatch(["default"], max_items=5) == Dispatch(items=(), wait_ms=None)


def test_expired_leases_return_items_to_the_head_in_their_old_order(
    limiter: Limiter, redis_client: redis.Redis
) -> None:
    scheduler = FairScheduler(limiter, lease=0.05)
    # Ids whose sort order is not their queue order: the order must come from the backlog.
    ids = ["j2", "j10", "j1", "a9", "z0"]
    for item_id in ids:
        scheduler.submit("acme", item_id)

    taken = scheduler.dispatch(["default"], max_items=3).items
    assert [i.id for i in taken] == ids[:3]
    assert reap_all(scheduler, redis_client, 3) == 3

    backlog = redis_client.lrange(key(scheduler, "backlog", "default", "acme", "normal"), 0, -1)
    assert [text(i) for i in backlog] == ids
    assert scheduler.in_flight() == 0
    assert scheduler.backlog("default", "acme") == 5
    # The worker that had them finishes late: its ack no longer counts.
    assert scheduler.ack("j2") is False
    # The next worker gets them, oldest first, before anything queued after them.
    assert [i.id for i in scheduler.dispatch(["default"], max_items=5).items] == ids


def test_many_expired_leases_come_back_in_their_old_order(
    limiter: Limiter, redis_client: redis.Redis
) -> None:
    scheduler = FairScheduler(limiter, lease=0.05)
    ids = [f"job-{n}" for n in range(40, 0, -1)]  # id order is the reverse of queue order
    for item_id in ids:
        scheduler.submit("acme", item_id)
    assert [i.id for i in scheduler.dispatch(["default"], max_items=40).items] == ids

    # reap() hands back 16 per call, newest first, so the oldest end up in front.
    assert reap_all(scheduler, redis_client, 40) == 40

    backlog = redis_client.lrange(key(scheduler, "backlog", "default", "acme", "normal"), 0, -1)
    assert [text(i) for i in backlog] == ids


def test_a_mass_expiry_reaped_by_dispatch_keeps_the_old_order(limiter: Limiter) -> None:
    """More leases run out than one dispatch hands back (16): nothing is served until all
    are back, so the oldest still go first."""
    scheduler = FairScheduler(limiter, lease=0.05)
    ids = [f"job-{n:02d}" for n in range(20)]
    for item_id in ids:
        scheduler.submit("acme", item_id)
    assert [i.id for i in scheduler.dispatch(["default"], max_items=20).items] == ids

    again: list[str] = []

    def redispatch() -> bool:
        for item in scheduler.dispatch(["default"], max_items=5).items:
            assert scheduler.ack(item.id)
            again.append(item.id)
        return len(again) == 20

    wait_until(redispatch, timeout=10, what="the leases to expire")

    assert again == ids


def test_expired_leases_are_reaped_by_dispatch_itself(limiter: Limiter) -> None:
    scheduler = FairScheduler(limiter, lease=0.05)
    for item_id in ("first", "second", "third"):
        scheduler.submit("acme", item_id)
    assert [i.id for i in scheduler.dispatch(["default"], max_items=2).items] == [
        "first",
        "second",
    ]

    again: list[str] = []

    def redispatch() -> bool:
        for item in scheduler.dispatch(["default"], max_items=3).items:
            assert scheduler.ack(item.id)
            again.append(item.id)
        return len(again) >= 3

    wait_until(redispatch, timeout=10, what="the leases to expire")

    # "third" was never taken, so it may go at once; the other two follow once reaped.
    assert sorted(again) == ["first", "second", "third"]
    assert scheduler.in_flight() == 0


def test_extend_keeps_an_item_in_flight(limiter: Limiter, redis_client: redis.Redis) -> None:
    scheduler = FairScheduler(limiter, lease=0.05)
    scheduler.submit("acme", "long")
    scheduler.submit("acme", "short")
    taken = scheduler.dispatch(["default"], max_items=2).items
    assert [i.id for i in taken] == ["long", "short"]

    assert scheduler.extend("long", 60) is True
    # Once "short" (same lease, same moment) has expired, "long" would have too.
    wait_until(lambda: scheduler.reap() == 1, timeout=10, what="the short lease to expire")

    assert redis_client.zscore(key(scheduler, "inflight"), "long") is not None
    assert scheduler.in_flight() == 1
    assert [i.id for i in scheduler.dispatch(["default"], max_items=2).items] == ["short"]
    assert scheduler.ack("long") is True
    assert scheduler.extend("long") is False
    assert scheduler.extend("never-seen") is False


def test_a_late_worker_cannot_settle_the_next_holders_lease(
    limiter: Limiter, redis_client: redis.Redis
) -> None:
    """Worker A's lease runs out and the item goes to worker B: whatever A does late (ack,
    nack with or without requeue, extend) leaves B's in-flight record as it was."""
    scheduler = FairScheduler(limiter, lease=0.05)
    scheduler.submit("acme", "job", payload=b"data")
    (held_by_a,) = scheduler.dispatch(["default"]).items
    assert held_by_a.lease
    assert reap_all(scheduler, redis_client, 1) == 1
    assert scheduler.extend(held_by_a) is False  # handed back: not A's any more

    scheduler.lease_ms = 60_000
    (held_by_b,) = scheduler.dispatch(["default"]).items
    assert held_by_b.id == "job"
    assert held_by_b.lease != held_by_a.lease
    deadline = redis_client.zscore(key(scheduler, "inflight"), "job")

    assert scheduler.extend(held_by_a, 3600) is False
    assert scheduler.nack(held_by_a, requeue=True, refund=True) is False
    assert scheduler.nack(held_by_a, requeue=False) is False
    assert scheduler.ack(held_by_a) is False
    assert redis_client.zscore(key(scheduler, "inflight"), "job") == deadline
    assert scheduler.in_flight() == 1
    assert scheduler.backlog("default") == 0
    assert redis_client.hget(key(scheduler, "payload"), "job") == b"data"

    assert scheduler.extend(held_by_b) is True
    assert scheduler.ack(held_by_b) is True
    assert scheduler.in_flight() == 0
    assert scheduler.backlog("default") == 0
    assert redis_client.hlen(key(scheduler, "lease")) == 0


def test_leases_are_told_apart_and_bare_ids_still_settle(scheduler: FairScheduler) -> None:
    for n in range(4):
        scheduler.submit("acme", f"job{n}")
    first = scheduler.dispatch(["default"], max_items=2).items
    second = scheduler.dispatch(["default"], max_items=1).items
    handed_over = scheduler.dispatch(["default"], hand_over=True).items
    # One token per dispatch call, never reused; none without a lease.
    assert first[0].lease == first[1].lease != second[0].lease
    assert [i.lease for i in handed_over] == [""]
    # Callers that keep only the id (older code) settle whoever holds the lease.
    assert scheduler.ack(first[0].id) is True
    assert scheduler.nack(first[1].id) is True
    assert scheduler.ack(second[0]) is True
    with pytest.raises(InvalidName, match="max_items must be 1 to 1000"):
        scheduler.dispatch(["default"], max_items=1001)


def test_ack_closes_the_record_once(scheduler: FairScheduler, redis_client: redis.Redis) -> None:
    scheduler.submit("acme", "job", payload=b"\x00\xffdata")
    (item,) = scheduler.dispatch(["default"]).items
    assert item.payload == b"\x00\xffdata"

    assert scheduler.ack("job") is True
    assert scheduler.ack("job") is False
    assert scheduler.ack("unknown") is False
    assert scheduler.in_flight() == 0
    assert redis_client.hget(key(scheduler, "meta"), "job") is None
    assert redis_client.hget(key(scheduler, "payload"), "job") is None
    # A closed id may be used again.
    assert scheduler.submit("acme", "job") is True


def test_dispatch_without_payload(scheduler: FairScheduler) -> None:
    scheduler.submit("acme", "job", payload=b"big")

    (item,) = scheduler.dispatch(["default"], with_payload=False).items

    assert item.payload == b""
    scheduler.nack("job")
    assert scheduler.dispatch(["default"]).items[0].payload == b"big"


def test_nack_requeues_at_the_head(scheduler: FairScheduler, redis_client: redis.Redis) -> None:
    ids = backlogged(scheduler, "acme", 4)
    (item,) = scheduler.dispatch(["default"]).items
    assert item.id == ids[0]

    assert scheduler.nack(item.id) is True

    backlog = redis_client.lrange(key(scheduler, "backlog", "default", "acme", "normal"), 0, -1)
    assert [text(i) for i in backlog] == ids
    assert scheduler.backlog("default", "acme") == 4
    assert scheduler.in_flight() == 0
    assert scheduler.nack(item.id) is False
    assert [i.id for i in scheduler.dispatch(["default"], max_items=4).items] == ids


def test_nack_without_requeue_drops_the_item(
    scheduler: FairScheduler, redis_client: redis.Redis
) -> None:
    ids = backlogged(scheduler, "acme", 3)
    (item,) = scheduler.dispatch(["default"]).items

    assert scheduler.nack(item.id, requeue=False) is True

    assert scheduler.in_flight() == 0
    assert scheduler.backlog("default") == 2
    assert redis_client.hget(key(scheduler, "meta"), item.id) is None
    assert [i.id for i in scheduler.dispatch(["default"], max_items=5).items] == ids[1:]
    assert scheduler.submit("acme", item.id) is True


def test_nack_with_refund_returns_the_tokens(limiter: Limiter, scheduler: FairScheduler) -> None:
    limiter.set_limit("global", budget(10))
    limiter.set_limit("tenant:acme", budget(5))
    limiter.set_limit("queue:default", budget(8))
    submit_many(scheduler, [("acme", "a", "default", "normal")], cost=2)
    submit_many(scheduler, [("acme", "b", "default", "normal")], cost=2)
    scheduler.dispatch(["default"], max_items=2)

    def remaining() -> dict[str, float]:
        return dict(limiter.peek("acme", queue="default").remaining)

    assert remaining() == pytest.approx(
        {"tenant:acme": 1, "queue:default": 4, "global": 6}, abs=0.01
    )
    assert scheduler.nack("a", refund=True) is True
    assert remaining() == pytest.approx(
        {"tenant:acme": 3, "queue:default": 6, "global": 8}, abs=0.01
    )
    assert scheduler.nack("b", refund=False) is True
    assert remaining() == pytest.approx(
        {"tenant:acme": 3, "queue:default": 6, "global": 8}, abs=0.01
    )
    assert scheduler.backlog("default", "acme") == 2


# -- input and validation ------------------------------------------------------------------


def test_a_duplicate_submit_is_refused(scheduler: FairScheduler) -> None:
    assert scheduler.submit("acme", "job") is True
    assert scheduler.submit("acme", "job") is False
    assert scheduler.submit("other", "job", priority="high", queue="elsewhere") is False
    assert scheduler.backlog("default") == 1
    assert scheduler.backlog("elsewhere") == 0

    (item,) = scheduler.dispatch(["default"]).items
    assert scheduler.submit("acme", item.id) is False  # in flight counts as known
    assert scheduler.dispatch(["default"]).items == ()


def test_an_unknown_priority_is_queued_as_normal_until_it_has_a_weight(
    scheduler: FairScheduler, caplog: pytest.LogCaptureFixture
) -> None:
    # Never refused (a job whose producer used a new priority name must not be lost), and
    # warned about once per name.
    assert scheduler.submit("acme", "job", priority="bulk") is True
    assert scheduler.submit("acme", "job", priority="bulk") is False  # a duplicate still
    assert scheduler.submit_many([SubmitItem("acme", "job2", priority="bulk")]) == ["queued"]
    warned = [r for r in caplog.records if "priority 'bulk' has no weight" in r.getMessage()]
    assert len(warned) == 1
    (item, item2) = scheduler.dispatch(["default"], max_items=2).items
    assert (item.id, item.priority, item2.priority) == ("job", "normal", "normal")

    scheduler.set_priority_weight("bulk", 0.5)
    assert scheduler.weights() == {"weight:priority:bulk": 0.5}
    backlogged(scheduler, "acme", 100, priority="bulk")
    backlogged(scheduler, "acme", 100, priority="normal")

    counts = shares(take(scheduler, 50), "priority")
    assert abs(counts["normal"] - 40) <= 1
    assert abs(counts["bulk"] - 10) <= 1


@pytest.mark.parametrize("item_id", ["", "has space", "x" * 257, 7, None, b"bytes"])
def test_bad_item_ids_are_refused(scheduler: FairScheduler, item_id: object) -> None:
    with pytest.raises(InvalidName):
        scheduler.submit("acme", item_id)  # type: ignore[arg-type]
    for call in (scheduler.ack, scheduler.nack, scheduler.extend):
        with pytest.raises(InvalidName):
            call(item_id)  # type: ignore[operator]
    assert scheduler.backlog("default") == 0


def test_the_longest_item_id_is_accepted(scheduler: FairScheduler) -> None:
    item_id = "x" * 256
    assert scheduler.submit("acme", item_id) is True
    assert scheduler.dispatch(["default"]).items[0].id == item_id


@pytest.mark.parametrize(
    "weight",
    [0, -1, math.nan, math.inf, -math.inf, 1e7, True, "2", [1], 5e-324, 1e-320, 1e-4, 2**1100],
)
def test_bad_weights_are_refused(scheduler: FairScheduler, weight: object) -> None:
    # 5e-324 and 1e-320 (denormals) were accepted and broke the lane (#11 finding 7).
    with pytest.raises(InvalidWeight, match="weight must be"):
        scheduler.set_tenant_weight("acme", weight)  # type: ignore[arg-type]
    with pytest.raises(InvalidWeight, match="weight must be"):
        scheduler.set_priority_weight("high", weight)  # type: ignore[arg-type]
    assert scheduler.weights() == {}


@pytest.mark.parametrize("weight", [MIN_WEIGHT, 1, MAX_WEIGHT])
def test_the_weight_bounds_are_inclusive(scheduler: FairScheduler, weight: float) -> None:
    scheduler.set_tenant_weight("acme", weight)
    assert scheduler.weights() == {"weight:tenant:acme": weight}


@pytest.mark.parametrize(
    ("field", "stored"),
    [
        ("weight:tenant:tiny", "5e-324"),  # written before weights were bounded
        ("weight:tenant:tiny", "1e-320"),
        ("weight:tenant:*", "5e-324"),
        ("weight:priority:normal", "5e-324"),
        ("weight:tenant:tiny", "inf"),
        ("weight:tenant:tiny", "nan"),
        ("weight:tenant:tiny", "1e300"),
    ],
)
def test_a_bad_stored_weight_cannot_break_a_lane(
    scheduler: FairScheduler, limiter: Limiter, field: str, stored: str
) -> None:
    """#11 finding 7: after two dispatches the lane's virtual time was inf, every submit
    raised 'value is not a valid float', and the backlog's items were orphaned."""
    limiter.client.hset(limiter.keys.config, field, stored)
    for i in range(4):
        assert scheduler.submit("tiny", f"t{i}")
        assert scheduler.submit("other", f"o{i}")
    served = [item.id for item in scheduler.dispatch(["default"], max_items=3).items]
    assert len(served) == 3
    counts = limiter.client.hgetall(scheduler.counts_key("default"))
    assert math.isfinite(float(counts[b":vt"]))
    for i in range(4, 6):  # submits after the lane's virtual time moved
        assert scheduler.submit("tiny", f"t{i}")
        assert scheduler.submit("new", f"n{i}")
    while batch := scheduler.dispatch(["default"], max_items=5).items:
        served += [item.id for item in batch]
    assert sorted(served) == sorted(
        [f"t{i}" for i in range(6)] + [f"o{i}" for i in range(4)] + ["n4", "n5"]
    )
    assert scheduler.backlog("default") == 0
    assert limiter.client.pttl(scheduler.counts_key("default")) > 0  # drained: it expires


def test_a_lane_left_with_an_infinite_virtual_time_recovers(
    scheduler: FairScheduler, limiter: Limiter
) -> None:
    """State written by the old arithmetic (an inf pass and virtual time) is read as 0."""
    scheduler.submit("a", "a0")
    scheduler.submit("b", "b0")
    first = scheduler.dispatch(["default"]).items  # the lane now has a virtual time
    scheduler.submit("a", "a1")
    client = limiter.client
    limiter.client.hset(scheduler.counts_key("default"), ":vt", "inf")
    # Found by content, not by name: the sorted set of the lane's backlogged tenants.
    (active,) = (
        key
        for key in client.scan_iter(match=f"*{limiter.namespace}*")
        if client.type(key) == b"zset" and client.zscore(key, "b") is not None
    )
    client.zadd(active, {"a": math.inf, "b": math.inf})
    assert scheduler.submit("c", "c0")
    served = {item.id for item in first}
    while batch := scheduler.dispatch(["default"], max_items=2).items:
        served |= {item.id for item in batch}
    assert served == {"a0", "a1", "b0", "c0"}


def test_bad_names_are_refused(scheduler: FairScheduler) -> None:
    for tenant in ("a:b", "{tag}", "*", "", "sp ace", 5):
        with pytest.raises(InvalidName):
            scheduler.submit(tenant, "job")  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        scheduler.submit("acme", "job", queue="a:b")
    with pytest.raises(InvalidName):
        scheduler.submit("acme", "job", priority="High")
    with pytest.raises(InvalidName):
        scheduler.set_tenant_weight("a:b", 2)
    with pytest.raises(InvalidName):
        scheduler.set_priority_weight("BAD", 2)
    with pytest.raises(InvalidName):
        scheduler.dispatch([])
    with pytest.raises(InvalidName):
        scheduler.dispatch(["a:b"])
    with pytest.raises(InvalidName):
        scheduler.dispatch(["default"], max_items=0)
    with pytest.raises(InvalidName):
        scheduler.backlog("a:b")
    assert scheduler.backlog("default") == 0


@pytest.mark.parametrize("cost", [0, -1, math.nan, math.inf, 1e13, "1", True, 2**1100])
def test_bad_costs_are_refused(scheduler: FairScheduler, cost: object) -> None:
    # 2**1100: an int too large for a float once raised OverflowError (#11 finding 8).
    with pytest.raises(InvalidCost):
        scheduler.submit("acme", "job", cost=cost)  # type: ignore[arg-type]
    with pytest.raises(InvalidCost):
        scheduler.gate("acme", "job", cost=cost)  # type: ignore[arg-type]
    assert scheduler.backlog("default") == 0


@pytest.mark.parametrize("lease", [0, -1, math.nan, math.inf])
def test_bad_leases_are_refused(limiter: Limiter, lease: float) -> None:
    with pytest.raises(ConfigError, match="lease"):
        FairScheduler(limiter, lease=lease)
    scheduler = FairScheduler(limiter)
    scheduler.submit("acme", "job")
    scheduler.dispatch(["default"])
    with pytest.raises(ConfigError, match="lease"):
        scheduler.extend("job", lease)


def test_a_weight_can_be_removed(scheduler: FairScheduler) -> None:
    scheduler.set_tenant_weight("acme", 4)
    scheduler.set_priority_weight("high", 9)
    assert scheduler.weights() == {"weight:priority:high": 9.0, "weight:tenant:acme": 4.0}

    scheduler.set_tenant_weight("acme", None)
    scheduler.set_priority_weight("high", None)

    assert scheduler.weights() == {}


# -- runtime changes -----------------------------------------------------------------------


def test_weight_changes_apply_on_the_next_dispatch(scheduler: FairScheduler) -> None:
    backlogged(scheduler, "a", 300)
    backlogged(scheduler, "b", 300)
    before = shares(take(scheduler, 20))
    assert before == Counter(a=10, b=10)

    scheduler.set_tenant_weight("a", 3)
    after = shares(take(scheduler, 40, batch=1))
    assert abs(after["a"] - 30) <= 2

    scheduler.set_tenant_weight("a", None)
    again = shares(take(scheduler, 40, batch=1))
    assert abs(again["a"] - 20) <= 2


def test_priority_weight_changes_apply_on_the_next_dispatch(scheduler: FairScheduler) -> None:
    backlogged(scheduler, "acme", 300, priority="high")
    backlogged(scheduler, "acme", 300, priority="low")
    take(scheduler, 40)

    scheduler.set_priority_weight("low", 3)
    counts = shares(take(scheduler, 40, batch=1), "priority")

    assert abs(counts["low"] - 20) <= 2


def test_limit_changes_apply_on_the_next_dispatch(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("global", budget(5))
    backlogged(scheduler, "acme", 20)
    assert len(scheduler.dispatch(["default"], max_items=20).items) == 5
    assert scheduler.dispatch(["default"]).items == ()

    limiter.delete_limit("global")

    assert len(scheduler.dispatch(["default"], max_items=5).items) == 5
    limiter.set_limit("queue:default", budget(2))
    assert len(scheduler.dispatch(["default"], max_items=5).items) == 2


def test_raising_a_tenant_cap_releases_a_parked_tenant_on_the_next_dispatch(
    limiter: Limiter, scheduler: FairScheduler, redis_client: redis.Redis
) -> None:
    limiter.set_limit("tenant:capped", budget(1))
    backlogged(scheduler, "capped", 10)
    backlogged(scheduler, "free", 10)
    first = scheduler.dispatch(["default"], max_items=4).items
    assert shares(first) == Counter(capped=1, free=3)
    assert redis_client.zscore(key(scheduler, "parked", "default"), "capped") is not None

    limiter.set_limit("tenant:capped", Limit(1_000_000, burst=100))

    # Released at once (not an hour later), and it joins at the virtual time: no catch-up.
    items = scheduler.dispatch(["default"], max_items=4).items
    assert 2 <= shares(items)["capped"] <= 3


# -- cost ----------------------------------------------------------------------------------


def test_costly_items_consume_their_cost(limiter: Limiter, scheduler: FairScheduler) -> None:
    limiter.set_limit("global", budget(10))
    submit_many(scheduler, (("acme", f"j{i}", "default", "normal") for i in range(5)), cost=3)

    items = scheduler.dispatch(["default"], max_items=5).items

    assert [i.cost for i in items] == [3.0, 3.0, 3.0]
    assert limiter.peek("acme").remaining["global"] == pytest.approx(1, abs=0.01)
    assert scheduler.dispatch(["default"]).items == ()


def test_an_item_costlier_than_a_lowered_burst_is_still_dispatched(
    limiter: Limiter, scheduler: FairScheduler, redis_client: redis.Redis
) -> None:
    limiter.set_limit("global", Limit(1, per=HOURLY, burst=10))
    backlogged(scheduler, "acme", 10)
    submit_many(scheduler, [("acme", "huge", "default", "normal")], cost=5)
    assert len(scheduler.dispatch(["default"], max_items=10).items) == 10  # bucket empty

    # Lowered below the item's cost; 50/s refills the 2 tokens in about 40 ms.
    limiter.set_limit("global", Limit(50, burst=2))
    found = wait_until(
        lambda: scheduler.dispatch(["default"]).items,
        timeout=10,
        what="the costly item to be dispatched",
    )

    assert found[0].id == "huge"
    assert found[0].cost == 5.0
    # It was charged the whole (lowered) burst, not its cost: 10 * 1 + 2 tokens admitted.
    flush_counters(limiter)
    shared = redis_client.hgetall(limiter.keys.shared)
    # Allowed tokens = admissions (a:q:*) + what they cost beyond one each (n:ax).
    assert float(shared[b"a:q:default"]) + float(shared.get(b"n:ax", 0)) == 12


# -- many tenants --------------------------------------------------------------------------


def test_ten_thousand_tenants_each_get_one_before_any_gets_two(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    tenants = [f"t{i:05d}" for i in range(10_000)]
    submit_many(scheduler, ((t, f"{t}.{n}", "default", "normal") for n in (0, 1) for t in tenants))
    limiter.set_limit("global", budget(12_000))
    assert scheduler.backlog("default") == 20_000

    first = take(scheduler, 10_000, batch=1000)
    second = take(scheduler, 2_000, batch=1000)

    assert len({i.tenant for i in first}) == 10_000
    assert {i.id.split(".")[1] for i in first} == {"0"}
    assert len({i.tenant for i in second}) == 2_000
    assert {i.id.split(".")[1] for i in second} == {"1"}
    assert scheduler.dispatch(["default"]).items == ()  # the global budget is spent


# -- cleanup -------------------------------------------------------------------------------


def test_idle_state_cleans_up(
    limiter: Limiter, scheduler: FairScheduler, redis_client: redis.Redis
) -> None:
    limiter.set_limit("tenant:capped", Limit(50, burst=1))
    backlogged(scheduler, "capped", 3)
    backlogged(scheduler, "free", 3, priority="high")
    backlogged(scheduler, "free", 3, priority="low")
    backlogged(scheduler, "free", 2, queue="other")

    done: list[str] = []

    def drain() -> bool:
        for item in scheduler.dispatch(["default", "other"], max_items=5).items:
            assert scheduler.ack(item.id)
            done.append(item.id)
        return len(done) == 11

    wait_until(drain, timeout=10, what="every item to be dispatched")

    pattern = f"{scheduler.keys.scheduler}:*"
    scheduler_keys = {text(k) for k in redis_client.scan_iter(match=pattern)}
    # Nothing stays: drained lanes leave the lanes set, and their counts (the lanes' clocks)
    # expire after the counter retention, as the tenant hashes do.
    assert scheduler_keys == {
        key(scheduler, "counts", "default"),
        key(scheduler, "counts", "other"),
    }
    for name in scheduler_keys:
        assert 0 < redis_client.pttl(name) <= limiter._core.retention_ms
    for tenant in ("capped", "free"):
        ttl = redis_client.pttl(limiter.keys.tenant(tenant))
        assert ttl > 0, f"tenant hash of {tenant} must expire when idle"


# -- properties ----------------------------------------------------------------------------

TENANTS = ("a", "b", "c")
PRIORITIES = ("high", "low")
QUEUES = ("q1", "q2")
ITEMS = 15  # a small pool of ids, so duplicates and hits on in-flight items are common
OPS = st.one_of(
    st.tuples(
        st.just("submit"),
        st.sampled_from(TENANTS),
        st.sampled_from(PRIORITIES),
        st.sampled_from(QUEUES),
        st.integers(0, ITEMS - 1),
    ),
    st.tuples(
        st.just("dispatch"),
        st.lists(st.sampled_from(QUEUES), min_size=1, max_size=2, unique=True),
        st.integers(1, 4),
    ),
    st.tuples(st.just("ack"), st.integers(0, ITEMS - 1)),
    st.tuples(st.just("nack"), st.integers(0, ITEMS - 1), st.booleans(), st.booleans()),
    st.tuples(st.just("expire"), st.integers(0, ITEMS - 1)),
    st.tuples(st.just("cap"), st.booleans()),
    st.tuples(
        st.just("purge"), st.sampled_from(QUEUES), st.one_of(st.none(), st.sampled_from(TENANTS))
    ),
)


class Model:
    """What the scheduler should hold: each class's backlog in order, and what is in flight."""

    def __init__(self) -> None:
        self.backlogs: dict[tuple[str, str, str], list[str]] = {}
        self.in_flight: dict[str, tuple[str, str, str]] = {}
        self.classes: dict[str, tuple[str, str, str]] = {}

    def where(self, item_id: str) -> tuple[str, str, str] | None:
        return self.classes.get(item_id)


def check_state(scheduler: FairScheduler, client: redis.Redis, model: Model) -> None:
    """Every item is in exactly one place and every counter and index agrees with the lists."""
    classes = [(q, t, p) for q in QUEUES for t in TENANTS for p in PRIORITIES]
    pipe = client.pipeline(transaction=False)
    for queue, tenant, priority in classes:
        pipe.lrange(key(scheduler, "backlog", queue, tenant, priority), 0, -1)
    pipe.keys(scheduler.keys.scheduler_prefixes.backlog + "*")
    pipe.zrange(key(scheduler, "inflight"), 0, -1)
    pipe.hkeys(key(scheduler, "meta"))
    for queue in QUEUES:
        pipe.hgetall(key(scheduler, "counts", queue))
        pipe.zrange(key(scheduler, "active", queue), 0, -1)
        pipe.zrange(key(scheduler, "parked", queue), 0, -1)
        for tenant in TENANTS:
            pipe.zrange(key(scheduler, "classes", queue, tenant), 0, -1)
    replies = iter(pipe.execute())

    seen: Counter[str] = Counter()
    for cls in classes:
        stored = [text(i) for i in next(replies)]
        assert stored == model.backlogs.get(cls, []), f"backlog {cls}"
        seen.update(stored)
    assert {text(k) for k in next(replies)} == {
        key(scheduler, "backlog", q, t, p) for (q, t, p), ids in model.backlogs.items() if ids
    }
    in_flight = {text(i) for i in next(replies)}
    assert in_flight == set(model.in_flight)
    seen.update(in_flight)
    assert all(n == 1 for n in seen.values()), seen
    assert {text(i) for i in next(replies)} == set(seen)
    for queue in QUEUES:
        counts = {text(f): text(v) for f, v in next(replies).items()}
        active = {text(t) for t in next(replies)}
        parked = {text(t) for t in next(replies)}
        sizes = {}
        for tenant in TENANTS:
            waiting = {p for p in PRIORITIES if model.backlogs.get((queue, tenant, p))}
            assert {text(p) for p in next(replies)} == waiting, f"priorities of {tenant}"
            sizes[tenant] = sum(len(model.backlogs.get((queue, tenant, p), [])) for p in waiting)
            assert int(counts.get(tenant, 0)) == sizes[tenant]
        assert int(counts.get(":total", 0)) == sum(sizes.values())
        assert not active & parked
        assert active | parked == {t for t, n in sizes.items() if n}


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, min_size=20, max_size=80))
def test_random_operations_keep_every_item_in_exactly_one_place(
    redis_client: redis.Redis, ops: list[tuple[object, ...]]
) -> None:
    limiter = Limiter(redis_client, namespace=f"p{uuid.uuid4().hex[:12]}")
    scheduler = FairScheduler(limiter)
    # "c" gets two items an hour, so it is parked (and skipped) for the rest of the run.
    limiter.set_limit("tenant:c", budget(2))
    capped = True
    model = Model()
    try:
        for op in ops:
            name = op[0]
            if name == "submit":
                _, tenant, priority, queue, n = op
                item_id = f"i{n}"
                cls = (str(queue), str(tenant), str(priority))
                fresh = scheduler.submit(cls[1], item_id, queue=cls[0], priority=cls[2])
                assert fresh == (item_id not in model.classes)
                if fresh:
                    model.classes[item_id] = cls
                    model.backlogs.setdefault(cls, []).append(item_id)
            elif name == "dispatch":
                _, queues, k = op
                result = scheduler.dispatch(list(queues), max_items=int(k))  # type: ignore[call-overload]
                assert len(result.items) <= int(k)  # type: ignore[call-overload]
                for item in result.items:
                    cls = (item.queue, item.tenant, item.priority)
                    assert item.id not in model.in_flight, f"{item.id} handed out twice"
                    assert model.classes[item.id] == cls
                    assert model.backlogs[cls][0] == item.id, "backlogs are FIFO"
                    model.backlogs[cls].pop(0)
                    model.in_flight[item.id] = cls
                if not result.items:
                    waiting = [c for c, ids in model.backlogs.items() if ids and c[0] in queues]
                    assert (result.wait_ms is None) == (not waiting)
                    held = capped and all(c[1] == "c" for c in waiting)
                    if waiting and not held:
                        pytest.fail(f"nothing dispatched from {waiting}: {result}")
            elif name == "ack":
                item_id = f"i{op[1]}"
                assert scheduler.ack(item_id) == (item_id in model.in_flight)
                if model.in_flight.pop(item_id, None):
                    del model.classes[item_id]
            elif name == "nack":
                _, n, requeue, refund = op
                item_id = f"i{n}"
                closed = scheduler.nack(item_id, requeue=bool(requeue), refund=bool(refund))
                assert closed == (item_id in model.in_flight)
                if closed:
                    cls = model.in_flight.pop(item_id)
                    if requeue:
                        model.backlogs[cls].insert(0, item_id)
                    else:
                        del model.classes[item_id]
            elif name == "purge":  # what waits in a queue (of one tenant) goes; in flight stays
                _, queue, who = op
                dropped = scheduler.purge(str(queue), tenant=who)  # type: ignore[arg-type]
                gone = [
                    i
                    for (q, t, _p), ids in model.backlogs.items()
                    if q == queue and who in (None, t)
                    for i in ids
                ]
                assert sorted(dropped) == sorted(gone)
                for cls in [c for c in model.backlogs if c[0] == queue and who in (None, c[1])]:
                    model.backlogs[cls] = []
                for item_id in gone:
                    del model.classes[item_id]
            elif name == "cap":  # change c's cap at run time: parked or free again
                capped = bool(op[1])
                limiter.set_limit("tenant:c", budget(2) if capped else Limit(1e6, burst=1e6))
            else:  # expire: the worker holding it died; its lease runs out now
                item_id = f"i{op[1]}"
                if item_id in model.in_flight:
                    redis_client.zadd(key(scheduler, "inflight"), {item_id: 0})
                    assert scheduler.reap() == 1
                    cls = model.in_flight.pop(item_id)
                    model.backlogs[cls].insert(0, item_id)
                else:
                    assert scheduler.reap() == 0
            check_state(scheduler, redis_client, model)
    finally:
        keys = list(redis_client.scan_iter(match=f"qrl:{{{limiter.namespace}}}:*", count=1000))
        if keys:
            redis_client.delete(*keys)


# -- route and adopt: jobs that wait on a queue system's own list -----------------------------
def _plain(limiter: Limiter, name: str = "plain") -> str:
    return f"{limiter.keys.base}:test:{name}"


def test_route_queues_behind_jobs_already_on_the_plain_list(
    scheduler: FairScheduler, limiter: Limiter
) -> None:
    plain = _plain(limiter)
    assert scheduler.route("a", "j1", plain) is False  # nothing anywhere: the plain list
    assert scheduler.route("a", "j2", plain) is False  # behind j1, not ahead of it
    scheduler.submit("b", "x1")  # a fair backlog forms on the lane
    assert scheduler.route("a", "j3", plain) is False  # j1, j2 still wait on the list
    limiter.client.delete(plain)
    assert scheduler.route("a", "j4", plain) is True  # list empty, backlog: the backlog
    assert [i.decode() for i in limiter.client.lrange(plain, 0, -1)] == []


@pytest.mark.parametrize(
    ("listed", "jobs", "moved", "left", "order"),
    [
        # oldest first, each to the tail of its class
        (["j1", "j2", "j3"], [("j1", "a"), ("j2", "b"), ("j3", "a")], 3, [], ["j1", "j2", "j3"]),
        # a job that is gone is only taken off the list
        (["j1", "j2"], [("j1", None), ("j2", "a")], 1, [], ["j2"]),
        # an id another worker took meanwhile is skipped
        (["j2"], [("j1", "a"), ("j2", "a")], 1, [], ["j2"]),
        # only what was asked for moves; the rest stays, in order
        (["j1", "j2", "j3"], [("j1", "a")], 1, ["j2", "j3"], ["j1"]),
    ],
)
def test_adopt_moves_plain_list_jobs_into_the_backlog(
    scheduler: FairScheduler,
    limiter: Limiter,
    listed: list[str],
    jobs: list[tuple[str, str | None]],
    moved: int,
    left: list[str],
    order: list[str],
) -> None:
    plain = _plain(limiter)
    limiter.client.rpush(plain, *listed)
    entries = [(i, t, "normal", 1.0) for i, t in jobs]
    assert scheduler.adopt("default", plain, entries) == moved
    assert [i.decode() for i in limiter.client.lrange(plain, 0, -1)] == left
    got = scheduler.dispatch(["default"], max_items=10).items
    # Tenants alternate fairly; inside a tenant, list order is kept.
    for tenant in {t for _, t in jobs if t}:
        mine = [i for i, t in jobs if t == tenant and i in order]
        assert [item.id for item in got if item.tenant == tenant] == mine
    assert sorted(item.id for item in got) == sorted(order)


def test_adopt_keeps_ids_it_holds_and_defaults_unknown_priorities(
    scheduler: FairScheduler, limiter: Limiter
) -> None:
    plain = _plain(limiter)
    scheduler.submit("a", "j1")
    limiter.client.rpush(plain, "j1", "j2")
    assert scheduler.adopt("default", plain, [("j1", "a", "normal", 1), ("j2", "a", "vip", 2)]) == 1
    assert limiter.client.llen(plain) == 0
    items = scheduler.dispatch(["default"], max_items=5).items
    assert [(i.id, i.priority, i.cost) for i in items] == [("j1", "normal", 1), ("j2", "normal", 2)]


def test_adopted_priorities_are_served_by_weight(
    scheduler: FairScheduler, limiter: Limiter
) -> None:
    plain = _plain(limiter)
    ids = [f"j{n}" for n in range(40)]
    limiter.client.rpush(plain, *ids)
    jobs = [(i, "a", "high" if n % 2 else "low", 1.0) for n, i in enumerate(ids)]
    assert scheduler.adopt("default", plain, jobs) == 40
    first = scheduler.dispatch(["default"], max_items=16).items
    assert [i.priority for i in first].count("high") == 12  # 3:1 while both wait


@pytest.mark.parametrize("bad", [("j 1", "a"), ("j1", "bad tenant"), ("j1", "a" * 300)])
def test_adopt_refuses_malformed_entries(scheduler: FairScheduler, bad: tuple[str, str]) -> None:
    with pytest.raises(InvalidName):
        scheduler.adopt("default", "somewhere", [(bad[0], bad[1], "normal", 1)])


def test_submit_with_a_bound_refuses_past_it_and_knows_done_ids(
    scheduler: FairScheduler,
) -> None:
    assert scheduler.submit("a", "j1", max_backlog=2)
    assert scheduler.submit("b", "j2", max_backlog=2)
    with pytest.raises(BacklogFull):
        scheduler.submit("c", "j3", max_backlog=2)
    assert scheduler.backlog("default") == 2
    (item,) = scheduler.dispatch(["default"]).items
    assert scheduler.ack(item, remember=60)
    assert scheduler.submit("c", "j3", max_backlog=2)
    assert not scheduler.submit("a", item.id)  # remembered as done: a redelivered copy
    with pytest.raises(ConfigError):
        scheduler.submit("a", "j9", max_backlog=-1)


def test_route_puts_a_job_asked_to_the_front_at_the_head_of_its_class(
    scheduler: FairScheduler, limiter: Limiter
) -> None:
    scheduler.submit("a", "j1")
    scheduler.submit("a", "j2")
    assert scheduler.route("a", "retry", _plain(limiter), at_front=True) is True
    order = [i.id for i in scheduler.dispatch(["default"], max_items=5).items]
    assert order == ["retry", "j1", "j2"]
