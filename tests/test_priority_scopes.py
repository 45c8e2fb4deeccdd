"""Priority scopes (``priority:<p>``): one bucket per priority across every tenant and queue,
checked with the others in the same decision, on every backend; its cap holds (R·T + B on
a virtual clock, against a reference model); and the fair scheduler shares what the caps
allow by weight, passing over a priority its cap holds back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from bucket_state import server_us
from conftest import scratch_limiter, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decisions import (
    BACKENDS,
    Backend,
    allow,
    assert_same,
    deny,
    drop,
    expected,
    open_backend,
    run_case,
)
from test_properties import TOLERANCE, Model, VirtualClock, check_windows
from test_scheduler import backlogged, budget, shares, take

from queue_ratelimit import (
    CostExceedsBurst,
    FairScheduler,
    InvalidName,
    InvalidScope,
    Limit,
    Limiter,
    Scope,
    ScopeLimit,
)
from queue_ratelimit._scheduler import SubmitItem


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, redis_url: str, namespace: str) -> Iterator[Backend]:
    opened = open_backend(request.param, redis_url, namespace)
    yield opened
    drop(opened)


# -- the decision table, on every backend (slow buckets: about a token an hour) -------------

CASES: list[dict[str, Any]] = [
    {
        "id": "one-bucket-per-priority-across-tenants",
        "steps": [
            {"set": "priority:low", "limit": "2/h"},
            allow("acme", {"priority:low": 1}, priority="low"),
            allow("beta", {"priority:low": 0}, priority="low"),
            deny(
                "gamma",
                "priority:low",
                1_800_000,
                {"priority:low": 0},
                priority="low",
                queue="emails",
            ),
            # Other priorities, and work without one, are not in that bucket.
            allow("acme", {}, priority="high"),
            allow("acme", {}),
        ],
    },
    {
        "id": "narrowest-first-and-all-or-nothing",
        "steps": [
            {"set": "global", "limit": "10/h"},
            {"set": "queue:emails", "limit": "10/h"},
            {"set": "tenant:*", "limit": "10/h"},
            {"set": "tenant:*:queue:emails", "limit": "10/h"},
            {"set": "priority:low", "limit": "1/h"},
            allow(
                "acme",
                {
                    "tenant:acme:queue:emails": 9,
                    "tenant:acme": 9,
                    "queue:emails": 9,
                    "priority:low": 0,
                    "global": 9,
                },
                queue="emails",
                priority="low",
            ),
            # Denied by the priority: no other bucket is charged.
            deny(
                "beta",
                "priority:low",
                3_600_000,
                {
                    "tenant:beta:queue:emails": 10,
                    "tenant:beta": 10,
                    "queue:emails": 9,
                    "priority:low": 0,
                    "global": 9,
                },
                queue="emails",
                priority="low",
            ),
            allow(
                "beta",
                {
                    "tenant:beta:queue:emails": 9,
                    "tenant:beta": 9,
                    "queue:emails": 8,
                    "global": 8,
                },
                queue="emails",
                priority="high",
            ),
        ],
    },
    {
        "id": "global-denial-leaves-the-priority-bucket",
        "steps": [
            {"set": "global", "limit": "1/h"},
            {"set": "priority:low", "limit": "5/h"},
            allow("acme", {"global": 0}, priority="high"),
            deny("acme", "global", 3_600_000, {"priority:low": 5, "global": 0}, priority="low"),
        ],
    },
    {
        "id": "exemptions",
        "steps": [
            {"set": "priority:low", "limit": "1/h"},
            {"exempt": "vip", "mode": "tenant"},
            {"exempt": "ops", "mode": "all"},
            # Exempt from tenant limits only: the priority still applies.
            allow("vip", {"priority:low": 0}, priority="low"),
            deny("vip", "priority:low", 3_600_000, {"priority:low": 0}, priority="low"),
            # Exempt from everything: no priority bucket either.
            allow("ops", {}, priority="low"),
        ],
    },
    {
        "id": "shadow-priority-only-would-deny",
        "steps": [
            {"set": "priority:low", "limit": "1/h", "shadow": True},
            allow("acme", {"priority:low": 0}, priority="low"),
            allow("acme", {"priority:low": 0}, priority="low", would_deny=("priority:low",)),
        ],
    },
    {
        "id": "peek-refund-and-cost",
        "steps": [
            {"set": "priority:batch", "limit": "4/h"},
            allow("acme", {"priority:batch": 4}, mode="peek", priority="batch", cost=3),
            allow("acme", {"priority:batch": 1}, priority="batch", cost=3),
            allow("beta", {"priority:batch": 3}, mode="refund", priority="batch", cost=2),
            {"acquire": "beta", "priority": "batch", "cost": 5, "raises": CostExceedsBurst},
        ],
    },
    {
        "id": "configuration-reads-back",
        "steps": [
            {"set": "priority:low", "limit": "20/s"},
            {"get": "priority:low", "is": ScopeLimit("priority:low", Limit.parse("20/s"))},
            {"limits": {"priority:low": ScopeLimit("priority:low", Limit.parse("20/s"))}},
            {"delete": "priority:low"},
            allow("acme", {}, priority="low"),
        ],
    },
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_priority_decision_table(backend: Backend, case: dict[str, Any]) -> None:
    assert_same(run_case(backend, case), expected(case), False)


@pytest.mark.parametrize(
    ("text", "error"),
    [("priority:", InvalidName), ("priority:Low", InvalidName), ("priority:a:b", InvalidScope)],
)
def test_bad_priority_scopes_are_refused(limiter: Limiter, text: str, error: type) -> None:
    with pytest.raises(error):
        limiter.set_limit(text, "1/s")


def test_priority_scope_parses_and_prints() -> None:
    scope = Scope.parse("priority:low")
    assert (scope.kind, scope.priority, str(scope)) == ("priority", "low", "priority:low")
    assert scope.limit_source({"priority:low"}, "tenant") == "priority:low"
    assert scope.limit_source({"priority:low"}, "all") is None


def test_a_priority_takes_no_concurrency_cap(limiter: Limiter) -> None:
    with pytest.raises(InvalidScope, match="rate limit"):
        limiter.set_concurrency("priority:low", 3)


# -- the cap holds: R·T + B on a virtual clock, against a reference model -------------------


def run_priorities(
    client: redis.Redis, limits: dict[str, Limit], ops: list[tuple[str, str, float, float]]
) -> None:
    """Replay (tenant, priority, cost, pause) steps: each scope's bucket (priority:low takes
    only low work, global everything) is fed with the decisions it saw, compared with its
    model, and every window of its admissions holds R·T + B."""
    scopes = list(limits)
    with scratch_limiter(client) as lim:
        for scope, limit in limits.items():
            lim.set_limit(scope, limit)
        clock = VirtualClock(lim, scopes)
        models = [Model(limit.rate_per_second / 1e6, limit.capacity) for limit in limits.values()]
        admitted: dict[str, list[tuple[int, float]]] = {s: [] for s in scopes}

        def applies(scope: str, priority: str) -> bool:
            return scope == "global" or scope == f"priority:{priority}"

        for tenant, priority, cost, pause in ops:
            clock.advance(pause)
            earliest = server_us(client) + clock.shift_us
            decision = lim.acquire(tenant, priority=priority, cost=cost)
            if decision.allowed:
                for index, (scope, model) in enumerate(zip(scopes, models, strict=True)):
                    if not applies(scope, priority):
                        continue
                    tokens, updated = clock.stored(index)
                    now = updated + clock.shift_us
                    assert model.level(now) >= cost - TOLERANCE, "admitted without the tokens"
                    model.tokens, model.at_us = model.level(now) - cost, now
                    assert tokens == pytest.approx(model.tokens, abs=TOLERANCE)
                    admitted[scope].append((now, cost))
            else:
                short = [
                    s
                    for s, m in zip(scopes, models, strict=True)
                    if applies(s, priority) and m.level(earliest) < cost
                ]
                assert short, f"denied {cost} of {priority} although every bucket held it"
                assert decision.denied_by in short
        for scope, limit in limits.items():
            check_windows(admitted[scope], limit)


@settings(max_examples=100, deadline=None, database=None)
@given(
    low=st.tuples(st.sampled_from([0.5, 2.0, 10.0]), st.sampled_from([1.0, 2.0, 5.0])),
    total=st.tuples(st.sampled_from([5.0, 20.0]), st.sampled_from([5.0, 10.0])),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["acme", "beta", "gamma"]),
            st.sampled_from(["low", "low", "high"]),
            st.sampled_from([0.25, 0.5, 1.0]),
            st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1.0)),
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_a_priority_cap_holds_rate_times_time_plus_burst(
    client: redis.Redis,
    low: tuple[float, float],
    total: tuple[float, float],
    ops: list[tuple[str, str, float, float]],
) -> None:
    limits = {
        "priority:low": Limit(low[0], burst=low[1]),
        "global": Limit(total[0], burst=total[1]),
    }
    run_priorities(client, limits, ops)


# -- the fair scheduler under a priority cap ---------------------------------------------


@pytest.fixture
def scheduler(limiter: Limiter) -> FairScheduler:
    return FairScheduler(limiter)


def test_a_binding_low_cap_gives_high_the_rest(limiter: Limiter, scheduler: FairScheduler) -> None:
    """Weights 3:1 would give low a quarter (100 of 400); its cap allows 50, and high takes
    every token the cap leaves: nothing stalls while high work waits."""
    limiter.set_limit("global", budget(400))
    limiter.set_limit("priority:low", budget(50))
    for tenant in ("acme", "beta"):
        backlogged(scheduler, tenant, 300, priority="high")
        backlogged(scheduler, tenant, 300, priority="low")

    items = take(scheduler, 400)

    counts = shares(items, "priority")
    assert counts["low"] == 50
    assert counts["high"] == 350
    # Until the cap binds, the weights share as ever: about one low in four.
    low = 0
    for n, item in enumerate(items, start=1):
        low += item.priority == "low"
        if low < 50:
            assert abs(low - 0.25 * n) <= 3, f"after {n} dispatches {low} were low"
    # Tenants still share equally.
    assert abs(shares(items)["acme"] - 200) <= 2
    denied = scheduler.dispatch(["default"])
    assert denied.items == ()
    assert denied.wait_ms is not None
    assert denied.wait_ms > 0


def test_a_cap_above_the_weighted_share_changes_nothing(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("global", budget(400))
    limiter.set_limit("priority:low", budget(200))
    backlogged(scheduler, "acme", 500, priority="high")
    backlogged(scheduler, "acme", 500, priority="low")

    counts = shares(take(scheduler, 400), "priority")

    assert abs(counts["low"] - 100) <= 2
    assert abs(counts["high"] - 300) <= 2


def test_tenants_with_only_capped_work_are_parked_and_others_go_on(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("priority:low", budget(10))
    for tenant in ("t1", "t2", "t3", "t4"):
        backlogged(scheduler, tenant, 20, priority="low")
    backlogged(scheduler, "urgent", 30, priority="high")

    items = take(scheduler, 40)

    counts = shares(items, "priority")
    assert counts == {"low": 10, "high": 30}
    result = scheduler.dispatch(["default"], max_items=10)
    assert result.items == ()
    # The low tenants wait for their priority's tokens, and the reply says for how long.
    assert result.wait_ms is not None
    assert result.wait_ms > 60_000
    parked = limiter.client.zrange(limiter.keys.parked("default"), 0, -1)
    assert sorted(p.decode() for p in parked) == ["t1", "t2", "t3", "t4"]


def test_lifting_the_cap_releases_the_parked_tenants_at_once(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("priority:low", budget(2))
    backlogged(scheduler, "acme", 5, priority="low")
    assert len(take(scheduler, 2)) == 2
    assert scheduler.dispatch(["default"]).items == ()

    limiter.delete_limit("priority:low")

    assert len(take(scheduler, 3)) == 3


def test_on_the_real_clock_low_never_exceeds_its_cap_and_everything_runs_once(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    """Parked low work wakes when its priority's tokens return, with no one polling faster
    than the waits the dispatches report; over the run, low holds R·T + B."""
    low_limit = Limit(40, burst=2)
    limiter.set_limit("priority:low", low_limit)
    ids = backlogged(scheduler, "acme", 30, priority="low")
    ids += backlogged(scheduler, "beta", 30, priority="low")
    ids += backlogged(scheduler, "beta", 20, priority="high")
    client = limiter.client
    seen: list[str] = []
    low_at: list[int] = []
    deadline = server_us(client) + 20_000_000
    while len(seen) < len(ids):
        assert server_us(client) < deadline, f"only {len(seen)} of {len(ids)} dispatched"
        result = scheduler.dispatch(["default"], max_items=8)
        now = server_us(client)
        for item in result.items:
            seen.append(item.id)
            scheduler.ack(item)
            if item.priority == "low":
                low_at.append(now)
        if not result.items:
            assert result.wait_ms is not None
            # Wait what the scheduler says (on the clock it is measured by), no less.
            target = now + int(result.wait_ms * 1000)
            wait_until(lambda t=target: server_us(client) >= t, timeout=5, what="the reported wait")
    assert sorted(seen) == sorted(ids)
    # Each low admission was recorded after its dispatch returned: a window's count may
    # include one admission made up to a round trip earlier.
    for i, start in enumerate(low_at):
        for j in range(i, len(low_at)):
            span = (low_at[j] - start) / 1e6
            assert j - i + 1 <= low_limit.rate_per_second * (span + 0.01) + low_limit.capacity


def hold_priority(limiter: Limiter, priority: str, held: str) -> None:
    """Hold ``priority:<priority>`` back for the next hour: its limit spent ("limit"), or
    paused ("pause")."""
    if held == "limit":
        limiter.set_limit(f"priority:{priority}", Limit(1, per=3600, burst=1))
        assert limiter.acquire("acme", "default", priority=priority).allowed
    else:
        limiter.pause(f"priority:{priority}", 3600)


@pytest.mark.parametrize("held", ["limit", "pause"])
@pytest.mark.parametrize("parked_by", ["submit", "submit_many", "route", "adopt"])
def test_a_priority_with_a_scope_but_no_weight_waits_for_it_in_the_backlog(
    limiter: Limiter, scheduler: FairScheduler, held: str, parked_by: str
) -> None:
    """A priority capped or paused (``priority:urgent``, e.g. from a producer's header) that
    was given no weight: the gate parks its job for that scope, and the backlog serves it
    no sooner. (It was queued as ``normal``, where its scope does not apply: the job the
    gate held back for ``priority:urgent`` ran at the next dispatch.)"""
    hold_priority(limiter, "urgent", held)
    verdict = scheduler.gate("acme", "j1", priority="urgent")
    assert (verdict.action, verdict.denied_by) == ("park", "priority:urgent")
    assert scheduler.submit("beta", "beta-1")  # (the lane is contended: route parks)
    plain = f"{scheduler.keys.config}:list"  # (a queue system's own list, e.g. RQ's)
    if parked_by == "submit":
        assert scheduler.submit("acme", "j1", priority="urgent")
    elif parked_by == "submit_many":
        assert scheduler.submit_many([SubmitItem("acme", "j1", priority="urgent")]) == ["queued"]
    elif parked_by == "route":
        assert scheduler.route("acme", "j1", plain, priority="urgent") is True
    else:
        limiter.client.rpush(plain, "j1")
        assert scheduler.adopt("default", plain, [("j1", "acme", "urgent", 1)]) == 1

    got = scheduler.dispatch(["default"], max_items=5)

    assert [i.id for i in got.items] == ["beta-1"]
    assert [(h.tenant, h.denied_by) for h in got.held_back] == [("acme", "priority:urgent")]
    (hint,) = scheduler.hints(["acme"], served_next=True)
    assert hint.denied_by == "priority:urgent"
    if held == "limit":
        limiter.delete_limit("priority:urgent")
    else:
        limiter.resume("priority:urgent")
    (item,) = scheduler.dispatch(["default"], max_items=5).items
    assert (item.id, item.priority) == ("j1", "urgent")


@pytest.mark.parametrize("held", ["limit", "pause"])
def test_a_priority_nobody_configured_is_judged_as_normal_at_the_gate_too(
    limiter: Limiter, scheduler: FairScheduler, held: str
) -> None:
    """A priority with no weight, limit or pause (``bulk``, from a producer's header) waits
    in the backlog as ``normal``; the gate and ``acquire`` judge it as ``normal`` too, so
    ``priority:normal`` holds it back wherever it is. (The gate judged it under its own
    name, with no priority scope: with ``priority:normal`` spent or paused it ran while the
    lane was uncontended, and was held back by ``priority:normal`` only once parked.)"""
    hold_priority(limiter, "normal", held)
    denied = limiter.acquire("acme", "default", priority="bulk")
    assert (denied.allowed, denied.denied_by) == (False, "priority:normal")
    verdict = scheduler.gate("acme", "j1", priority="bulk")
    assert (verdict.action, verdict.denied_by) == ("park", "priority:normal")
    assert scheduler.submit("acme", "j1", priority="bulk")
    got = scheduler.dispatch(["default"], max_items=5)
    assert list(got.items) == []
    assert [h.denied_by for h in got.held_back] == ["priority:normal"]
    # Given a weight, it is a priority of its own, which priority:normal does not hold.
    scheduler.set_priority_weight("bulk", 2)
    assert limiter.acquire("acme", "default", priority="bulk").allowed
    assert "priority:normal" not in limiter.peek("acme", "default", priority="bulk").remaining


def test_a_refund_under_an_unconfigured_priority_goes_back_to_priority_normal(
    limiter: Limiter,
) -> None:
    """What an unconfigured priority took from ``priority:normal`` (the Celery gate's
    credit, say) is given back there when refunded under the same name."""
    limiter.set_limit("priority:normal", Limit(1, per=3600, burst=2))
    taken = limiter.acquire("acme", "default", priority="bulk", cost=2)
    assert taken.allowed
    assert taken.remaining["priority:normal"] == 0
    assert not limiter.acquire("acme", "default", priority="normal").allowed
    limiter.refund("acme", "default", priority="bulk", cost=1)
    assert limiter.acquire("acme", "default", priority="normal").allowed
