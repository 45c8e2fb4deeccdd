"""Silences (lua/buckets.lua, "Silences"): leases and concurrency slots that run out while
nobody could reach Redis are kept for their holders for one lease after the silence.

A silence is made without waiting: the shared hash's ``s:seen`` record (the last call that
touched a lease, the lease, and the grace window) is written back in time, and deadlines
are moved into the past, on Redis's clock. The lease is long (60 s), so the time a test
takes changes nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pytest
import redis
from conftest import scratch_limiter
from kombu.asynchronous import Hub

from queue_ratelimit import DispatchedItem, FairScheduler, Limiter
from queue_ratelimit.celery._gate import _lease_ran_out
from queue_ratelimit.celery._health import RedisHealth
from queue_ratelimit.celery._runtime import Runtime
from queue_ratelimit.celery._settings import CelerySettings
from queue_ratelimit.celery._settler import AsyncSettler, Settlement
from queue_ratelimit.celery._wire import Wire

LEASE_MS = 60_000
# A gap in the calls longer than this is a silence (SILENCE in buckets.lua: half a lease).
SILENT_MS = LEASE_MS // 2


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def write_record(lim: Limiter, now: int, seen: int, window: tuple[int, int] | None = None) -> None:
    """The shared hash's record as a call ``seen`` ms from ``now`` would have left it, with
    a grace window (from, until) as offsets from ``now``, or none."""
    start, until = (now + window[0], now + window[1]) if window else (0, 0)
    lim.client.hset(lim.keys.shared, "s:seen", f"{now + seen} {LEASE_MS} {start} {until}")


def read_record(lim: Limiter) -> tuple[int, int, int, int]:
    raw = lim.client.hget(lim.keys.shared, "s:seen")
    assert raw is not None
    seen, lease, start, until = (int(v) for v in raw.decode().split())
    return seen, lease, start, until


def run_out_at(scheduler: FairScheduler, item_id: str, deadline: int) -> None:
    key = scheduler.keys.inflight
    assert scheduler.client.zadd(key, {item_id: deadline}, xx=True, ch=True) == 1


@pytest.fixture
def scheduler(limiter: Limiter) -> FairScheduler:
    return FairScheduler(limiter, lease=LEASE_MS / 1000)


def dispatch_one(scheduler: FairScheduler, item_id: str = "job") -> DispatchedItem:
    scheduler.submit("acme", item_id, payload=b"x")
    (item,) = scheduler.dispatch(["default"]).items
    assert item.id == item_id
    return item


# -- reap, table-driven -----------------------------------------------------------------------


@dataclass(frozen=True)
class ReapCase:
    """The last call noted ``seen`` ms ago, a grace window (from, until) open or not (ms
    from now), the lease's deadline (ms from now), and whether ``reap`` takes it back;
    ``window_after``: the window the call leaves (from, until from now; None: none open)."""

    id: str
    seen: int
    window: tuple[int, int] | None
    deadline: int
    reaped: bool
    window_after: tuple[int, int] | None = None


REAP_CASES = [
    # Redis was called all along: a lease that ran out was its dead holder's.
    ReapCase("no silence: ran out", -1_000, None, -500, True),
    ReapCase("no silence: ran out long ago", -1_000, None, -3_600_000, True),
    ReapCase("no silence: live", -1_000, None, 5_000, False),
    ReapCase("a gap shorter than half a lease is no silence", -SILENT_MS + 1_000, None, -500, True),
    # Nobody reached Redis for 40 s: a lease that ran out in that time is kept for a lease.
    ReapCase("ran out in the silence", -40_000, None, -10_000, False, (-40_000, LEASE_MS)),
    ReapCase("ran out as the silence began", -40_000, None, -39_999, False, (-40_000, LEASE_MS)),
    ReapCase("ran out before the silence", -40_000, None, -50_000, True, (-40_000, LEASE_MS)),
    # The window a silence opened, as later calls find it.
    ReapCase("in the grace", -100, (-40_000, 30_000), -10_000, False, (-40_000, 30_000)),
    ReapCase("before the window", -100, (-40_000, 30_000), -50_000, True, (-40_000, 30_000)),
    ReapCase("after the grace", -100, (-40_000, -1), -10_000, True),
    # A second silence: begun while the first's window was open, it keeps its start.
    ReapCase(
        "two silences, merged", -35_000, (-80_000, -30_000), -60_000, False, (-80_000, LEASE_MS)
    ),
    ReapCase(
        "two silences, apart", -35_000, (-80_000, -40_000), -60_000, True, (-35_000, LEASE_MS)
    ),
    ReapCase(
        "two silences, in the second",
        -35_000,
        (-80_000, -40_000),
        -20_000,
        False,
        (-35_000, LEASE_MS),
    ),
]


@pytest.mark.parametrize("case", REAP_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("call", ["reap", "dispatch"])
def test_reap_keeps_leases_that_ran_out_in_a_silence(
    scheduler: FairScheduler, case: ReapCase, call: str
) -> None:
    item = dispatch_one(scheduler)
    now = redis_ms(scheduler.client)
    run_out_at(scheduler, item.id, now + case.deadline)
    write_record(scheduler.limiter, now, case.seen, case.window)

    if call == "reap":
        assert scheduler.reap() == (1 if case.reaped else 0)
    else:
        again = scheduler.dispatch(["default"]).items
        assert [i.id for i in again] == (["job"] if case.reaped else [])

    seen, lease, start, until = read_record(scheduler.limiter)
    after = redis_ms(scheduler.client)
    # (A call soon after the last one noted may leave the note as it was: NOTE_STEP.)
    assert now + case.seen <= seen <= after
    assert lease == LEASE_MS
    if case.window_after is None:
        assert until <= after  # none open: reaping goes by the deadlines alone
    else:
        if -case.seen > SILENT_MS:
            assert seen >= now  # the call that found the silence noted itself
        assert start == now + case.window_after[0]
        # (until: one lease after the call that found the silence, on Redis's clock)
        assert now + case.window_after[1] <= until <= after + case.window_after[1]


def test_each_namespace_reaps_by_its_own_note(scheduler: FairScheduler) -> None:
    """The library keeps the last note text it read with its numbers (lease_horizon's
    memo): calls that alternate between a namespace in a silence's grace and one in none,
    each with a lease that ran out 10 s ago, go by their own note, round after round."""
    with scratch_limiter(scheduler.client) as lim:
        other = FairScheduler(lim, lease=LEASE_MS / 1000)
        kept, taken = dispatch_one(scheduler), dispatch_one(other)
        for _ in range(3):
            now = redis_ms(scheduler.client)
            write_record(scheduler.limiter, now, -100, (-40_000, 30_000))
            write_record(other.limiter, now, -100)
            run_out_at(scheduler, kept.id, now - 10_000)
            run_out_at(other, taken.id, now - 10_000)
            assert scheduler.reap() == 0
            assert scheduler.reap() == 0
            assert other.reap() == 1
            (taken,) = other.dispatch(["default"]).items
            assert scheduler.reap() == 0


# -- a lease in the grace: renewed, settled, or taken back when it ends -----------------------


def silence(scheduler: FairScheduler, item: DispatchedItem) -> int:
    """Redis was not reached for 40 s, and the item's lease ran out 10 s ago, in that time;
    the call that finds the silence opens the window. Returns Redis time (ms) before it."""
    now = redis_ms(scheduler.client)
    run_out_at(scheduler, item.id, now - 10_000)
    write_record(scheduler.limiter, now, -40_000)
    assert scheduler.reap() == 0
    return now


def end_grace(scheduler: FairScheduler) -> None:
    """The window's grace is over (and Redis was called meanwhile: no new silence)."""
    _seen, lease, start, _until = read_record(scheduler.limiter)
    now = redis_ms(scheduler.client)
    scheduler.client.hset(scheduler.keys.shared, "s:seen", f"{now} {lease} {start} {now - 1}")


def test_a_lease_renewed_in_the_grace_stays_with_its_holder(scheduler: FairScheduler) -> None:
    item = dispatch_one(scheduler)
    before = silence(scheduler, item)

    assert scheduler.extend(item) is True
    deadline = scheduler.client.zscore(scheduler.keys.inflight, item.id)
    assert deadline is not None
    assert deadline >= before + LEASE_MS
    end_grace(scheduler)
    assert scheduler.reap() == 0
    assert scheduler.dispatch(["default"]).items == ()
    assert scheduler.ack(item) is True


def test_a_lease_settled_in_the_grace_is_closed(scheduler: FairScheduler) -> None:
    item = dispatch_one(scheduler)
    silence(scheduler, item)

    assert scheduler.ack(item, remember=60) is True
    end_grace(scheduler)
    assert scheduler.reap() == 0
    assert scheduler.in_flight() == 0
    assert scheduler.backlog("default") == 0


def test_a_lease_not_renewed_in_the_grace_is_taken_back_after_it(
    scheduler: FairScheduler,
) -> None:
    item = dispatch_one(scheduler)
    silence(scheduler, item)
    assert scheduler.reap() == 0  # still in the grace

    end_grace(scheduler)
    assert scheduler.reap() == 1
    (again,) = scheduler.dispatch(["default"]).items
    assert again.id == item.id
    assert again.lease != item.lease
    assert scheduler.extend(item) is False  # the first holder's lease is over


def test_a_lease_that_ran_out_before_the_silence_is_taken_back_at_once(
    scheduler: FairScheduler,
) -> None:
    dead = dispatch_one(scheduler, "dead")
    live = dispatch_one(scheduler, "live")
    now = redis_ms(scheduler.client)
    run_out_at(scheduler, dead.id, now - 50_000)  # while Redis was called: its holder died
    run_out_at(scheduler, live.id, now - 10_000)  # in the silence
    write_record(scheduler.limiter, now, -40_000)

    assert [i.id for i in scheduler.dispatch(["default"], max_items=5).items] == ["dead"]
    assert scheduler.extend(live) is True


# -- settlements sent twice ----------------------------------------------------------------------


def settle_reply(scheduler: FairScheduler, item: DispatchedItem | str, remember: float) -> object:
    """The script's own reply to an ack (1 closed, 2 closed already under this lease, 0 not
    in flight for this caller), as the Celery gate's wire reads it."""
    keys, args = scheduler.settle_call(item, "ack", remember)
    return scheduler._scripts.call("scheduler.lua", keys, args)


def test_an_ack_sent_again_is_told_from_a_lease_that_ran_out(scheduler: FairScheduler) -> None:
    item = dispatch_one(scheduler)
    assert settle_reply(scheduler, item, 60) == 1
    assert settle_reply(scheduler, item, 60) == 2, "closed by its first sending"
    assert scheduler.ack(item, remember=60) is True

    # A holder whose lease ran out, and whose item another worker ran and acked since.
    scheduler.submit("acme", "other", payload=b"x")
    (first,) = scheduler.dispatch(["default"]).items
    run_out_at(scheduler, first.id, redis_ms(scheduler.client) - 1)
    assert scheduler.reap() == 1
    (second,) = scheduler.dispatch(["default"]).items
    assert settle_reply(scheduler, second, 60) == 1
    assert settle_reply(scheduler, first, 60) == 0
    assert scheduler.ack(first, remember=60) is False
    # A bare id names no lease: nothing tells its sendings apart.
    assert settle_reply(scheduler, "other", 60) == 0


def test_the_gates_settler_hears_an_ack_sent_again_as_closed(scheduler: FairScheduler) -> None:
    """The Celery gate sends an ack again when the connection its first sending went out on
    dropped before the reply (in doubt): the first may have closed the item. That is no
    lease that ran out (which the gate warns of)."""
    hub = Hub()
    wire = Wire(scheduler.client, hub)
    outcomes: list[tuple[str, object, str, bool | None]] = []
    settler = AsyncSettler(scheduler, wire, lambda *outcome: outcomes.append(outcome))
    assert settler.sendable(dispatch_one(scheduler))
    item = dispatch_one(scheduler, "again")
    try:
        settler.send(item, "ack", 60, keep_slot=False)
        settler.send(item, "ack", 60, keep_slot=False)
        loop = hub.create_loop()
        deadline = time.monotonic() + 10
        while len(outcomes) < 2:
            assert time.monotonic() < deadline, "no replies"
            next(loop)
    finally:
        wire.close()
        hub.close()
    assert [(o[0], o[2], o[3]) for o in outcomes] == [("again", "ack", True)] * 2


@pytest.mark.parametrize("how", ["ack", "requeue", "drop"])
def test_the_gate_warns_of_a_lease_that_ran_out_only_for_work_that_ran(
    how: Settlement, caplog: pytest.LogCaptureFixture
) -> None:
    """A requeue or a drop did not run the job: whoever holds it now runs it once."""
    with caplog.at_level(logging.WARNING, logger="queue_ratelimit.celery"):
        _lease_ran_out("job-1", how)
    warned = [r for r in caplog.records if "no longer in flight" in r.getMessage()]
    assert len(warned) == (1 if how == "ack" else 0)


# -- concurrency slots ---------------------------------------------------------------------------


def slot_holders(lim: Limiter, scope: str) -> dict[str, float]:
    return {
        k.decode(): v for k, v in lim.client.zrange(lim.keys.slots(scope), 0, -1, withscores=True)
    }


def slot_runs_out_at(lim: Limiter, scope: str, token: str, deadline_ms: int) -> None:
    key = lim.keys.slots(scope)
    assert lim.client.zadd(key, {token: deadline_ms * 1000}, xx=True, ch=True) == 1


@dataclass(frozen=True)
class SlotCase:
    """A cap of 1 held by a worker whose hold ran out ``deadline`` ms ago; the last call
    that touched a lease came ``seen`` ms ago. ``taken``: another job takes the slot."""

    id: str
    seen: int
    deadline: int
    taken: bool


SLOT_CASES = [
    SlotCase("no silence: the dead holder's slot is taken", -1_000, -500, True),
    SlotCase("held in a silence: the cap holds", -40_000, -10_000, False),
    SlotCase("ran out before the silence: taken", -40_000, -50_000, True),
]


@pytest.mark.parametrize("case", SLOT_CASES, ids=lambda c: c.id)
def test_a_slot_that_ran_out_in_a_silence_still_counts(limiter: Limiter, case: SlotCase) -> None:
    limiter.set_concurrency("tenant:acme", 1)
    first = limiter.acquire("acme", hold=60)
    assert first.slot is not None
    now = redis_ms(limiter.client)
    slot_runs_out_at(limiter, "tenant:acme", first.slot.token, now + case.deadline)
    write_record(limiter, now, case.seen)

    second = limiter.acquire("acme", hold=60)

    assert second.allowed is case.taken
    assert read_record(limiter)[0] >= now + case.seen  # the call that took back slots looked
    held = slot_holders(limiter, "tenant:acme")
    if case.taken:
        assert first.slot.token not in held
        assert limiter.extend_slot(first, 60) is False
    else:
        assert list(held) == [first.slot.token]
        # Due when the grace ends (a lease after the silence), not at once.
        assert second.retry_after > LEASE_MS / 1000 / 2
        assert limiter.extend_slot(first, 60) is True
        assert limiter.release(first) is True
        assert limiter.acquire("acme", hold=60).allowed


def test_a_slot_renewed_in_the_grace_is_kept(limiter: Limiter) -> None:
    limiter.set_concurrency("tenant:acme", 1)
    decision = limiter.acquire("acme", hold=60)
    assert decision.slot is not None
    now = redis_ms(limiter.client)
    slot_runs_out_at(limiter, "tenant:acme", decision.slot.token, now - 10_000)
    write_record(limiter, now, -40_000)

    assert limiter.extend_slot(decision, 60) is True  # the call that finds the silence
    assert slot_holders(limiter, "tenant:acme")[decision.slot.token] >= (now + 60_000) * 1000


def test_an_items_slots_ride_its_lease_through_a_silence(limiter: Limiter) -> None:
    """Slots a dispatched item holds are renewed with its lease in the grace (``extend``)."""
    scheduler = FairScheduler(limiter, lease=LEASE_MS / 1000)
    limiter.set_concurrency("tenant:acme", 1)
    item = dispatch_one(scheduler)
    assert item.slot is not None
    now = redis_ms(limiter.client)
    run_out_at(scheduler, item.id, now - 10_000)
    slot_runs_out_at(limiter, "tenant:acme", item.slot.token, now - 10_000)
    write_record(limiter, now, -40_000)

    assert scheduler.extend(item) is True
    assert slot_holders(limiter, "tenant:acme")[item.slot.token] >= (now + LEASE_MS) * 1000


# -- the Celery worker back within the grace ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("lease", "backoff", "probes"),
    [
        (5.0, (0.25, 5.0), (0.25, 5 / 6)),  # a short lease: probed every sixth of it
        (30.0, (0.25, 5.0), (0.25, 5.0)),  # the defaults: as set
        (0.3, (0.25, 5.0), (0.1, 0.1)),  # no busier than every 0.1 s
        (30.0, None, None),  # no breaker: none made
    ],
)
def test_the_celery_breaker_probes_within_a_sixth_of_the_lease(
    lease: float,
    backoff: tuple[float, float] | None,
    probes: tuple[float, float] | None,
) -> None:
    """After an outage the gate must renew its leases soon after Redis answers: a lease
    that ran out in an outage too short to be found as a silence is not kept longer."""
    runtime = Runtime(None, CelerySettings(lease=lease, redis_backoff=backoff))
    assert runtime._backoff() == probes


def test_the_gate_rests_at_most_a_sixth_of_the_lease_after_a_failed_call() -> None:
    clock = Clock()
    health = RedisHealth("open", clock=clock, max_rest=5 / 6)
    health.failed(redis.TimeoutError("Timeout reading from socket"), clock.now - 2.0)
    assert health.resting()
    clock.now += 5 / 6
    assert not health.resting(), "not the 8 s of 4x a 2 s timeout"
