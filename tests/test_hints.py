"""Producer hints that see queued demand: ``FairScheduler.hint`` and the transit count.

A hint predicts when a job enqueued now would start: its buckets must hold the tokens of
the same tenant's jobs ahead of it (in the fair backlog, and in transit: enqueued with a
hint, not yet seen by a gate) before its own. Buckets here refill by the hour, so no token
comes back while a test runs and every predicted wait is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import redis
from conftest import wait_until

from queue_ratelimit import FairScheduler, Limit, Limiter
from queue_ratelimit._scheduler import Hint

HOUR_MS = 3_600_000.0


def hourly(n: float, burst: float) -> Limit:
    """``n`` per hour: a token every ``3600 / n`` seconds, none back while a test runs."""
    return Limit(n, per=3600, burst=burst)


@pytest.fixture
def scheduler(limiter: Limiter) -> FairScheduler:
    return FairScheduler(limiter)


def hints(scheduler: FairScheduler, tenant: str, n: int, **kw: object) -> list[Hint]:
    """``n`` jobs of ``tenant`` enqueued at once, each counted as in transit."""
    return [
        scheduler.hint(tenant, item_id=f"{tenant}-{i}", **kw)  # type: ignore[arg-type]
        for i in range(n)
    ]


def transit(scheduler: FairScheduler, tenant: str, queue: str = "default") -> int:
    return int(scheduler.client.zcard(scheduler.keys.transit(queue, tenant)))


# -- what a hint predicts (table-driven) -------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """Limits, work already queued, then one hint: the jobs ahead and the wait it predicts
    (``wait_h``, in hours: the buckets refill by the hour), and the scope that binds."""

    name: str
    limits: dict[str, Limit]
    ahead: int = 0
    wait_h: float = 0.0
    denied_by: str | None = None
    backlog: dict[str, int] = field(default_factory=dict)  # tenant -> jobs in the backlog
    in_transit: int = 0  # acme's jobs enqueued with a hint before this one
    cost: float = 1
    exempt: bool = False
    shadow: bool = False


TEN, TWO, ONE = ({"tenant:*": hourly(n, n)} for n in (10, 2, 1))
ACME, Q = "tenant:acme", "queue:default"
OWN2, QUEUE4 = {ACME: hourly(2, 2)}, {Q: hourly(4, 4)}
CASES = [
    Case("nothing queued, tokens left", TEN),
    Case("fifth of a burst of ten", TEN, 4, in_transit=4),
    Case("eleventh waits one token", TEN, 10, 1 / 10, ACME, in_transit=10),
    Case("ninetieth waits eighty tokens", TEN, 89, 80 / 10, ACME, in_transit=89),
    Case("the backlog counts too", OWN2, 4, 3 / 2, ACME, backlog={"acme": 3}, in_transit=1),
    Case("another tenant's backlog is not ahead under a tenant bucket", TWO, backlog={"other": 50}),
    # 2 of acme's own, 2 x 3 of b's and c's, then this one: 9 tokens, 4 there.
    Case(
        "a queue bucket serves the others about one for one (equal weights)",
        QUEUE4,
        2,
        5 / 4,
        Q,
        backlog={"b": 50, "c": 50},
        in_transit=2,
    ),
    # 5 + 1 + 1 = 7 tokens, 4 there.
    Case(
        "the others ahead are at most what they have",
        QUEUE4,
        5,
        3 / 4,
        Q,
        backlog={"b": 1},
        in_transit=5,
    ),
    # (4 + 1) x 2 = 10 tokens, all there.
    Case("jobs ahead are taken to cost what this one does", TEN, 4, in_transit=4, cost=2),
    Case("costlier jobs wait sooner", TEN, 5, 2 / 10, ACME, in_transit=5, cost=2),
    Case("an exempt tenant never waits", ONE, 5, in_transit=5, exempt=True),
    Case("dry-run never waits", ONE, 5, in_transit=5, shadow=True),
    Case(
        "a cost above the burst is charged as the burst, as the gate does",
        TWO,
        1,
        2 / 2,
        ACME,
        in_transit=1,
        cost=5,
    ),
]


# Both transports run the same Lua: the Functions library, and scripts with it prepended.
@pytest.mark.parametrize("transport", ["fcall", "evalsha"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hint_predicts_the_start_behind_the_jobs_ahead(
    limiter: Limiter, scheduler: FairScheduler, case: Case, transport: str
) -> None:
    limiter._scripts.transport = transport  # type: ignore[assignment]
    for scope, limit in case.limits.items():
        limiter.set_limit(scope, limit)
    if case.exempt:
        limiter.set_exempt("acme")
    if case.shadow:
        limiter.set_shadow(True)
    for tenant, n in case.backlog.items():
        for i in range(n):
            scheduler.submit(tenant, f"bl-{tenant}-{i}")
    for i in range(case.in_transit):
        scheduler.hint("acme", item_id=f"before-{i}", cost=case.cost)

    hint = scheduler.hint("acme", item_id="this", cost=case.cost)

    assert hint.backlog == case.ahead
    assert hint.wait_ms == pytest.approx(case.wait_h * HOUR_MS, rel=1e-3, abs=1e-6)
    assert hint.allowed is (case.wait_h == 0)
    assert hint.denied_by == case.denied_by
    assert hint.concurrency is False
    assert limiter._scripts.transport == transport


def test_ninety_jobs_at_once_are_told_when_each_would_start(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    """The issue's example, at an hourly rate so nothing refills while it runs: 90 jobs at
    once into ``tenant:*`` 10 per period, burst 10, no worker. The first ten start at once;
    each later one a token (a tenth of the period) after the one before."""
    limiter.set_limit("tenant:*", hourly(10, 10))
    told = hints(scheduler, "acme", 90)
    assert [h.backlog for h in told] == list(range(90))
    assert told[4] == Hint(True, 0.0, None, 4)
    for k, hint in enumerate(told, start=1):
        assert hint.wait_ms == pytest.approx(max(0, k - 10) * HOUR_MS / 10, rel=1e-3)
    assert told[89].denied_by == "tenant:acme"


def test_six_jobs_into_a_per_minute_bucket(limiter: Limiter, scheduler: FairScheduler) -> None:
    limiter.set_limit("tenant:*", Limit(2, per=60, burst=2))
    told = hints(scheduler, "acme", 6)
    # (A token comes back every 30 s: the milliseconds this takes move each by well under 1%.)
    expected = [0, 0, 30_000, 60_000, 90_000, 120_000]
    assert [h.wait_ms for h in told] == pytest.approx(expected, rel=1e-2, abs=1)
    assert [h.allowed for h in told] == [True, True, False, False, False, False]


def test_lanes_and_tenants_are_counted_apart(limiter: Limiter, scheduler: FairScheduler) -> None:
    limiter.set_limit("tenant:*", hourly(1, 1))
    hints(scheduler, "acme", 3, queue="emails")
    assert scheduler.hint("acme", queue="emails").backlog == 3
    assert scheduler.hint("acme", queue="reports").backlog == 0
    assert scheduler.hint("other", queue="emails").backlog == 0


# -- the job served next (hints(served_next=True), table-driven) -------------------------------
@dataclass(frozen=True)
class Next:
    """Limits, buckets spent, then acme's parked jobs (priority, cost) in this order: what
    ``hints(served_next=True)`` names, and the priority a dispatch then serves (None: it
    serves nothing and holds acme back by the scope the hint names)."""

    name: str
    limits: dict[str, Limit]
    parked: list[tuple[str, float]]
    binding: str | None
    served: str | None = None
    spent: list[dict[str, object]] = field(default_factory=list)  # acquires by acme, each
    # until denied


LOW1 = {"priority:low": hourly(1, 1)}
NEXT = [
    Next(
        "its priority scope spent", LOW1, [("low", 1)], "priority:low", spent=[{"priority": "low"}]
    ),
    Next(
        "a spent priority is passed over for the next one",
        LOW1,
        [("low", 1), ("normal", 1)],
        None,
        "normal",
        spent=[{"priority": "low"}],
    ),
    Next(
        "every priority held: the one due first",
        {**LOW1, "priority:normal": Limit(1, per=600, burst=1)},
        [("low", 1), ("normal", 1)],
        "priority:normal",
        spent=[{"priority": "low"}, {"priority": "normal"}],
    ),
    Next(
        "its priority's scope binds longer than its own",
        {**LOW1, ACME: Limit(1, per=600, burst=1)},
        [("low", 1)],
        "priority:low",
        spent=[{"priority": "low"}],
    ),
    Next(
        "its head job's cost: 5 with 2 tokens",
        {ACME: hourly(10, 10)},
        [("normal", 5)],
        ACME,
        spent=[{"cost": 8}],
    ),
    Next(
        "its head job's cost: 1 with 2 tokens",
        {ACME: hourly(10, 10)},
        [("normal", 1)] * 3,
        None,
        "normal",
        spent=[{"cost": 8}],
    ),
    Next(
        "a cost above the burst, bucket full", {ACME: hourly(3, 3)}, [("normal", 5)], None, "normal"
    ),
    Next("nothing binds", {}, [("high", 2)], None, "high"),
]


@pytest.mark.parametrize("transport", ["fcall", "evalsha"])
@pytest.mark.parametrize("case", NEXT, ids=[c.name for c in NEXT])
def test_hints_of_the_job_served_next_say_what_the_dispatch_does(
    limiter: Limiter, scheduler: FairScheduler, case: Next, transport: str
) -> None:
    limiter._scripts.transport = transport  # type: ignore[assignment]
    for scope, limit in case.limits.items():
        limiter.set_limit(scope, limit)
    for options in case.spent:
        if "cost" in options:
            assert limiter.acquire("acme", "default", **options).allowed  # type: ignore[arg-type]
            continue
        while limiter.acquire("acme", "default", **options).allowed:  # type: ignore[arg-type]
            pass
    for i, (priority, cost) in enumerate(case.parked):
        assert scheduler.submit("acme", f"job-{i}", priority=priority, cost=cost)
    parked = scheduler.client.hgetall(scheduler.keys.counts("default"))

    (hint,) = scheduler.hints(["acme"], served_next=True)

    assert scheduler.client.hgetall(scheduler.keys.counts("default")) == parked  # (reads)
    assert hint.binding == case.binding
    assert hint.allowed is (case.binding is None)
    assert hint.backlog == 0
    served = scheduler.dispatch(["default"], max_items=1)
    assert [i.priority for i in served.items] == ([case.served] if case.served else [])
    if case.binding is not None:
        assert served.held_back[-1].binding == case.binding


def test_hints_of_the_job_served_next_for_tenants_without_a_backlog(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    """A tenant with nothing parked is judged as a job of priority normal and cost 1, and
    several tenants are judged in one call, each its own next job."""
    limiter.set_limit("tenant:*", hourly(2, 2))
    limiter.set_limit("priority:low", hourly(1, 1))
    assert limiter.acquire("bare", "default", cost=2).allowed
    assert limiter.acquire("lowly", "default", priority="low").allowed
    scheduler.submit("lowly", "l-1", priority="low")
    scheduler.submit("costly", "c-1", cost=2)
    scheduler.submit("costly", "c-2", cost=2)
    got = scheduler.hints(["bare", "lowly", "costly", "idle"], served_next=True)
    assert [h.binding for h in got] == ["tenant:bare", "priority:low", None, None]
    assert scheduler.hints([], served_next=True) == []


# -- what counts a job, and what stops counting it ---------------------------------------------
def test_a_hint_without_an_id_counts_nothing(limiter: Limiter, scheduler: FairScheduler) -> None:
    for _ in range(3):
        assert scheduler.hint("acme").backlog == 0
    assert transit(scheduler, "acme") == 0


def test_hinting_the_same_job_twice_counts_it_once(scheduler: FairScheduler) -> None:
    scheduler.hint("acme", item_id="j1")
    again = scheduler.hint("acme", item_id="j1")
    assert again.backlog == 0, "a job is not ahead of itself"
    assert transit(scheduler, "acme") == 1


def test_if_allowed_counts_only_jobs_that_would_start(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    """The reject policy: a refused job is never enqueued, so it must not count."""
    limiter.set_limit("tenant:*", hourly(2, 2))
    told = [scheduler.hint("acme", item_id=f"j{i}", count="if_allowed") for i in range(5)]
    assert [h.allowed for h in told] == [True, True, False, False, False]
    assert transit(scheduler, "acme") == 2


def test_a_job_leaves_transit_when_it_runs_or_joins_the_backlog(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    """Counted all along: a job the gate parks stays in transit until its submit counts it
    in the backlog (a worker may park several in one batch, a moment later)."""
    limiter.set_limit("tenant:*", hourly(1, 1))
    hints(scheduler, "acme", 3)
    assert scheduler.gate("acme", "acme-0").action == "run"
    assert transit(scheduler, "acme") == 2
    assert scheduler.gate("acme", "acme-1").action == "park"
    assert scheduler.hint("acme").backlog == 2
    scheduler.submit("acme", "acme-1")  # where a parked job goes: counted in the backlog now
    assert transit(scheduler, "acme") == 1
    assert scheduler.hint("acme").backlog == 2  # acme-1 in the backlog, acme-2 in transit
    assert scheduler.gate("acme", "acme-1").action == "duplicate"
    assert scheduler.hint("acme").backlog == 2


def test_a_job_parked_without_a_gate_call_leaves_transit_for_the_backlog(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    """A saturated Celery worker parks what arrives without asking the gate."""
    limiter.set_limit("tenant:*", hourly(1, 1))
    hints(scheduler, "acme", 3)
    scheduler.submit("acme", "acme-0", payload=b"x")
    assert transit(scheduler, "acme") == 2
    assert scheduler.hint("acme").backlog == 3, "counted once, in the backlog"


class NoTimer:
    """A consumer timer that never fires (the test flushes by hand)."""

    def call_after(self, *_: object) -> NoTimer:
        return self

    def cancel(self) -> None:
        pass


def test_jobs_admitted_on_credit_are_taken_off_by_the_worker(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    """Jobs admitted on credit pass no gate call: the worker's credit ledger takes them off
    the transit count by id, one round trip per flush."""
    from queue_ratelimit.celery._credit import CreditLedger

    limiter.set_limit("tenant:*", hourly(100, 100))
    hints(scheduler, "acme", 10)
    verdict = scheduler.gate("acme", "acme-0", credit=4)
    assert (verdict.action, verdict.credit) == ("run", 4)
    assert transit(scheduler, "acme") == 9, "the gate takes off only the job it saw"

    ledger = CreditLedger(lambda: limiter, NoTimer, ttl=60)
    key = ("acme", "default", "normal", 1.0)
    ledger.grant(key, verdict.credit)
    assert all(ledger.spend(key, f"acme-{i}") for i in (3, 1, 2, 4))
    assert not ledger.spend(key, "acme-5"), "only as many as granted"
    assert transit(scheduler, "acme") == 9, "nothing sent yet"
    ledger.flush()
    left = scheduler.client.zrange(scheduler.keys.transit("default", "acme"), 0, -1)
    assert sorted(i.decode() for i in left) == [f"acme-{i}" for i in range(5, 10)]
    ledger.close()


class RecordingWire:
    """The gate's wire as the ledger sees it: ``send`` queues calls for the event loop."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.sent: list[tuple[object, ...]] = []

    def send(self, commands: list[tuple[object, ...]], on_reply: object) -> None:
        self.sent.extend(commands)
        for command in commands:  # (what the event loop would write)
            self.client.execute_command(*command)


def test_with_the_gates_wire_credited_jobs_leave_transit_as_they_are_admitted(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    from queue_ratelimit.celery._credit import CreditLedger

    hints(scheduler, "acme", 3)
    wire = RecordingWire(scheduler.client)
    ledger = CreditLedger(lambda: limiter, NoTimer, ttl=60)
    ledger.wire = lambda: wire  # type: ignore[assignment,return-value]
    key = ("acme", "default", "normal", 1.0)
    ledger.grant(key, 2, free=True)
    assert ledger.spend(key, "acme-1")
    assert wire.sent == [("ZREM", scheduler.keys.transit("default", "acme"), "acme-1")]
    assert transit(scheduler, "acme") == 2
    ledger.close()


def test_route_counts_jobs_on_the_plain_list_and_adopt_moves_them(
    limiter: Limiter, scheduler: FairScheduler, redis_client: redis.Redis
) -> None:
    """RQ: a job put on RQ's list is in transit; moved into the backlog it is counted
    there; taken by a gate it is no longer ahead of anything."""
    limiter.set_limit("tenant:*", hourly(1, 1))
    plain = f"{limiter.keys.base}-plain"
    try:
        for i in range(4):
            scheduler.route("acme", f"r{i}", plain, wait_ms=1000.0 * i)
        assert redis_client.llen(plain) == 4
        assert scheduler.hint("acme").backlog == 4
        assert scheduler.adopt("default", plain, [("r0", "acme", "normal", 1.0)]) == 1
        assert transit(scheduler, "acme") == 3
        assert scheduler.hint("acme").backlog == 4, "r0 waits in the backlog now"
        redis_client.lrem(plain, 1, "r1")  # a worker pops it, and gates it
        assert scheduler.gate("acme", "r1").action == "park"  # behind r0
        assert transit(scheduler, "acme") == 3, "counted until it is in the backlog"
        scheduler.submit("acme", "r1")
        assert transit(scheduler, "acme") == 2
    finally:
        redis_client.delete(plain)


# -- drift: lost jobs stop counting ------------------------------------------------------------
def test_jobs_lost_in_transit_stop_counting(limiter: Limiter) -> None:
    """Jobs counted at enqueue and then lost (a purged broker queue, a deleted RQ list)
    never reach a gate: their entries lapse, twice their predicted wait plus the grace
    after they were counted, and the transit set goes with the last of them."""
    scheduler = FairScheduler(limiter, transit_grace=0.2)
    limiter.set_limit("tenant:*", Limit(100, burst=5))  # waits of 10 ms each past the 5th
    told = hints(scheduler, "acme", 20)
    assert told[-1].backlog == 19
    assert told[-1].wait_ms == pytest.approx(150, abs=20)
    key = scheduler.keys.transit("default", "acme")
    assert 0 < scheduler.client.pttl(key) <= 200 + 2 * 200 + 100

    wait_until(lambda: scheduler.hint("acme").backlog == 0, timeout=10, what="entries lapse")
    wait_until(lambda: not scheduler.client.exists(key), timeout=10, what="the set expires")
    assert scheduler.hint("acme", item_id="next").allowed, "a fresh start: nothing ahead"


def test_a_long_predicted_wait_keeps_its_job_counted_that_long(limiter: Limiter) -> None:
    """The lapse follows the prediction: a job told it waits an hour is not forgotten
    after the grace (a short grace here, hence no sleep: its lapse time is read)."""
    scheduler = FairScheduler(limiter, transit_grace=1)
    limiter.set_limit("tenant:*", hourly(1, 1))
    hints(scheduler, "acme", 3)
    key = scheduler.keys.transit("default", "acme")
    now_ms = scheduler.client.time()[0] * 1000
    lapses = [s for _, s in scheduler.client.zrange(key, 0, -1, withscores=True)]
    assert lapses[0] == pytest.approx(now_ms + 1000, abs=2000)
    assert lapses[2] == pytest.approx(now_ms + 2 * 2 * HOUR_MS + 1000, rel=1e-3)
    assert scheduler.client.pttl(key) == pytest.approx(2 * 2 * HOUR_MS + 1000, rel=1e-3)
