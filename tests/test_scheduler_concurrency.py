"""FairScheduler under concurrency caps: dispatch takes slots with the tokens, the in-flight
record gives them back (ack, nack, reap) exactly once, a tenant at its own cap is parked and
woken by a release, the gate takes slots too."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
import redis

from queue_ratelimit import FairScheduler, Limiter, Slot


@pytest.fixture
def scheduler(limiter: Limiter) -> FairScheduler:
    return FairScheduler(limiter, lease=3600)


def server_ms(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) / 1000


def parked(scheduler: FairScheduler, queue: str) -> dict[str, float]:
    raw = scheduler.client.zrange(scheduler.keys.parked(queue), 0, -1, withscores=True)
    return {k.decode(): v for k, v in raw}


def submit(scheduler: FairScheduler, tenant: str, n: int, queue: str = "q") -> None:
    for i in range(n):
        assert scheduler.submit(tenant, f"{tenant}-{i}", queue=queue)


def tenants(items: object) -> list[str]:
    return [item.tenant for item in items]  # type: ignore[attr-defined]


def test_dispatch_respects_a_tenant_cap_and_other_tenants_flow(scheduler: FairScheduler) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("tenant:*", 2)
    submit(scheduler, "acme", 5)
    submit(scheduler, "bigco", 1)
    batch = scheduler.dispatch(["q"], max_items=10)
    assert sorted(tenants(batch.items)) == ["acme", "acme", "bigco"]
    assert lim.running("tenant:acme") == 2
    assert lim.running("tenant:bigco") == 1
    for item in batch.items:
        assert item.slot is not None
        assert item.slot.scopes == (f"tenant:{item.tenant}",)
    assert "acme" in parked(scheduler, "q"), "held back by its own cap: parked"
    again = scheduler.dispatch(["q"], max_items=10)
    assert again.items == ()
    assert again.wait_ms is not None
    assert again.wait_ms > 3_000_000, "until its earliest lease ends (or a release)"
    assert scheduler.backlog("q", "acme") == 3


def test_ack_releases_and_wakes_the_parked_tenant(scheduler: FairScheduler) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("tenant:acme", 1)
    submit(scheduler, "acme", 3)
    first = scheduler.dispatch(["q"], max_items=10).items
    assert tenants(first) == ["acme"]
    assert parked(scheduler, "q")["acme"] > server_ms(scheduler.client) + 3_000_000
    # Its lease is an hour: only the release can let the next one through now.
    assert scheduler.ack(first[0]) is True
    assert lim.running("tenant:acme") == 0
    assert parked(scheduler, "q")["acme"] == 0, "woken by the release"
    second = scheduler.dispatch(["q"], max_items=10).items
    assert [i.id for i in second] == ["acme-1"]
    assert scheduler.ack(first[0]) is False, "acked twice: nothing released twice"
    assert lim.running("tenant:acme") == 1


def test_a_limiter_release_wakes_a_parked_tenant_too(scheduler: FairScheduler) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("tenant:*", 1)
    held = lim.acquire("acme", hold=3600)
    submit(scheduler, "acme", 1)
    assert scheduler.dispatch(["q"]).items == ()
    assert "acme" in parked(scheduler, "q")
    assert lim.release(held)
    assert [i.id for i in scheduler.dispatch(["q"]).items] == ["acme-0"]


@pytest.mark.parametrize(("requeue", "refund"), [(True, False), (False, False), (True, True)])
def test_nack_releases(scheduler: FairScheduler, requeue: bool, refund: bool) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("tenant:acme", 1)
    submit(scheduler, "acme", 1)
    (item,) = scheduler.dispatch(["q"]).items
    assert lim.running("tenant:acme") == 1
    assert scheduler.nack(item, requeue=requeue, refund=refund) is True
    assert lim.running("tenant:acme") == 0
    assert scheduler.nack(item) is False
    redo = scheduler.dispatch(["q"]).items
    assert [i.id for i in redo] == (["acme-0"] if requeue else [])


def test_an_expired_lease_releases_its_slots_once(scheduler: FairScheduler) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("tenant:acme", 1)
    lim.set_concurrency("global", 10)
    submit(scheduler, "acme", 1)
    (item,) = scheduler.dispatch(["q"]).items
    assert item.slot is not None
    assert item.slot.scopes == ("tenant:acme", "global")
    # The worker died: its lease runs out (as Redis's clock sees it) and reap hands it back.
    inflight = lim.keys.inflight
    scheduler.client.zadd(inflight, {item.id: server_ms(scheduler.client) - 1000}, xx=True)
    assert scheduler.reap() == 1
    assert lim.running("tenant:acme") == 0
    assert lim.running("global") == 0
    (again,) = scheduler.dispatch(["q"]).items
    assert again.lease != item.lease
    assert lim.running("tenant:acme") == 1
    # The dead worker's late ack changes nothing: the new holder keeps its slot.
    assert scheduler.ack(item) is False
    assert lim.running("tenant:acme") == 1
    assert lim.release(item.slot) is False
    assert lim.running("tenant:acme") == 1
    assert scheduler.ack(again) is True
    assert lim.running("tenant:acme") == 0


def test_extend_renews_the_slots(scheduler: FairScheduler) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("queue:q", 2)
    submit(scheduler, "acme", 1)
    short = FairScheduler(lim, lease=5)
    (item,) = short.dispatch(["q"]).items
    assert item.slot is not None
    key = lim.keys.slots("queue:q")
    before = scheduler.client.zscore(key, item.slot.token)
    assert before is not None
    assert short.extend(item, lease=3000) is True
    after = scheduler.client.zscore(key, item.slot.token)
    assert after is not None
    assert after >= before + 2_000_000_000
    assert short.ack(item) is True
    assert lim.running("queue:q") == 0


def test_a_queue_cap_stops_the_lane_without_parking(scheduler: FairScheduler) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("queue:q", 1)
    submit(scheduler, "acme", 2)
    submit(scheduler, "bigco", 2)
    batch = scheduler.dispatch(["q", "other"], max_items=10)
    assert len(batch.items) == 1
    assert parked(scheduler, "q") == {}
    stopped = scheduler.dispatch(["q"], max_items=10)
    assert stopped.items == ()
    assert stopped.wait_ms is not None
    assert stopped.wait_ms > 3_000_000, "until the earliest lease ends (a release comes sooner)"
    assert scheduler.submit("acme", "other-0", queue="other")
    other = scheduler.dispatch(["q", "other"], max_items=10)
    assert [i.queue for i in other.items] == ["other"], "a queue cap binds only its lane"
    scheduler.ack(batch.items[0])
    assert len(scheduler.dispatch(["q"], max_items=10).items) == 1


def test_a_global_cap_stops_every_lane(scheduler: FairScheduler) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("global", 1)
    submit(scheduler, "acme", 1, queue="a")
    submit(scheduler, "bigco", 1, queue="b")
    batch = scheduler.dispatch(["a", "b"], max_items=10)
    assert len(batch.items) == 1
    assert scheduler.dispatch(["a", "b"], max_items=10).items == ()
    scheduler.ack(batch.items[0])
    assert len(scheduler.dispatch(["a", "b"], max_items=10).items) == 1


def test_hand_over_keeps_the_slot_until_released(scheduler: FairScheduler) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("tenant:acme", 1)
    submit(scheduler, "acme", 2)
    (item,) = scheduler.dispatch(["q"], max_items=5, hand_over=True).items
    assert item.lease == ""
    assert item.slot is not None
    assert lim.running("tenant:acme") == 1
    assert scheduler.dispatch(["q"], hand_over=True).items == ()
    assert lim.release(item.slot) is True
    assert len(scheduler.dispatch(["q"], hand_over=True).items) == 1


def test_dispatch_without_caps_holds_no_slot(scheduler: FairScheduler) -> None:
    submit(scheduler, "acme", 2)
    batch = scheduler.dispatch(["q"], max_items=5)
    assert [i.slot for i in batch.items] == [None, None]
    assert [i.lease for i in batch.items] == [batch.items[0].lease] * 2
    raw = scheduler.client.hgetall(scheduler.keys.lease)
    assert set(raw.values()) == {batch.items[0].lease.encode()}


def test_a_rate_cap_and_a_concurrency_cap_bind_together(scheduler: FairScheduler) -> None:
    """The item admitted takes both; one held back by its rate bucket takes no slot."""
    lim = scheduler.limiter
    lim.set_concurrency("tenant:acme", 5)
    lim.set_limit("tenant:acme", "1/h")
    submit(scheduler, "acme", 3)
    batch = scheduler.dispatch(["q"], max_items=5)
    assert len(batch.items) == 1
    assert lim.running("tenant:acme") == 1
    assert scheduler.client.scard(lim.keys.waiters("tenant:acme")) == 0, (
        "parked by its rate bucket: no release can wake it"
    )


# -- the worker gate ------------------------------------------------------------------------


def test_gate_takes_a_slot_and_grants_no_credit(scheduler: FairScheduler) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("tenant:*", 2)
    verdict = scheduler.gate("acme", "g-1", queue="q", credit=5)
    assert verdict.action == "run"
    assert verdict.credit == 0
    assert verdict.slot is not None
    assert verdict.slot.scopes == ("tenant:acme",)
    assert lim.running("tenant:acme") == 1
    assert scheduler.gate("acme", "g-2", queue="q").action == "run"
    denied = scheduler.gate("acme", "g-3", queue="q")
    assert denied.action == "park"
    assert denied.denied_by == "tenant:acme"
    assert denied.concurrency is True
    assert denied.slot is None
    assert lim.release(verdict.slot) is True
    assert scheduler.gate("acme", "g-3", queue="q").action == "run"


def test_gate_hold_bounds_the_slot(scheduler: FairScheduler) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("tenant:acme", 1)
    seconds, micros = scheduler.client.time()
    before = int(seconds) * 1_000_000 + int(micros)
    verdict = scheduler.gate("acme", "g-1", queue="q", hold=10)
    assert verdict.slot is not None
    deadline = scheduler.client.zscore(lim.keys.slots("tenant:acme"), verdict.slot.token)
    assert deadline is not None
    assert before + 10_000_000 <= deadline < before + 3_600_000_000


def test_gate_credit_still_works_without_caps(scheduler: FairScheduler) -> None:
    scheduler.limiter.set_limit("tenant:*", "1000/s")
    verdict = scheduler.gate("acme", "g-1", queue="q", credit=3)
    assert verdict.action == "run"
    assert verdict.credit == 3
    assert verdict.slot is None


def test_slot_text_round_trips() -> None:
    slot = Slot("7/job-1", ("tenant:acme", "global"))
    assert Slot.parse(str(slot)) == slot
    assert Slot.parse(str(slot).encode()) == slot
    with pytest.raises(ValueError, match="not a concurrency slot"):
        Slot.parse("7")


def test_the_embedded_engine_schedules_under_caps() -> None:
    from queue_ratelimit._embedded import embedded_client

    with Limiter(embedded_client(), namespace="conc-sched") as lim:
        lim.set_concurrency("tenant:*", 1)
        scheduler = FairScheduler(lim, lease=3600)
        submit(scheduler, "acme", 2)
        submit(scheduler, "bigco", 1)
        first = scheduler.dispatch(["q"], max_items=5).items
        assert sorted(tenants(first)) == ["acme", "bigco"]
        acme = next(i for i in first if i.tenant == "acme")
        assert scheduler.ack(acme) is True
        assert [i.id for i in scheduler.dispatch(["q"]).items] == ["acme-1"]
        verdict = scheduler.gate("zed", "g-1", queue="q2", credit=4)
        assert verdict.slot is not None
        assert verdict.credit == 0


# -- many processes dispatching ---------------------------------------------------------

WORKERS = 5
TENANT_CAP = 2
ITEMS_PER_TENANT = 60
RUN_STEPS = 20


def dispatcher(url: str, namespace: str, ready: Any, start: Any, results: Any) -> None:
    """Dispatch one item at a time until the backlog is empty; while each item "runs",
    count it in a per-tenant counter shared by every process (INCR), note the most seen
    running at once, then stop counting it (DECR) and ack it."""
    lim = Limiter.from_url(url, namespace=namespace)
    scheduler = FairScheduler(lim, lease=3600)
    lim.peek("acme")  # connected, the library loaded
    ready.put(1)
    start.wait(60)
    most: dict[str, int] = {}
    done = 0
    while True:
        batch = scheduler.dispatch(["q"])
        if not batch.items:
            if batch.wait_ms is None:
                break  # every backlog is empty
            continue  # parked tenants: another worker's ack wakes them
        (item,) = batch.items
        counter = f"{lim.keys.base}:test-running:{item.tenant}"
        running = int(lim.client.incr(counter))
        for _ in range(RUN_STEPS):  # the job "runs" for a few round trips, watching others
            running = max(running, int(lim.client.get(counter) or 0))
        most[item.tenant] = max(most.get(item.tenant, 0), running)
        lim.client.decr(counter)
        assert scheduler.ack(item)
        done += 1
    results.put((most, done))
    lim.close()


@pytest.mark.slow
def test_processes_dispatching_never_run_more_than_a_tenant_cap(
    limiter: Limiter, redis_url: str
) -> None:
    limiter.set_concurrency("tenant:*", TENANT_CAP)
    scheduler = FairScheduler(limiter)
    for tenant in ("acme", "bigco", "carol"):
        submit(scheduler, tenant, ITEMS_PER_TENANT)
    ctx = multiprocessing.get_context("spawn")
    ready, start, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=dispatcher, args=(redis_url, limiter.namespace, ready, start, results))
        for _ in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:  # every worker at the line before any starts, so they overlap
            ready.get(timeout=120)
        start.set()
        reports = [results.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
    assert sum(done for _, done in reports) == 3 * ITEMS_PER_TENANT
    for most, _ in reports:
        assert all(n <= TENANT_CAP for n in most.values()), most
    for tenant in ("acme", "bigco", "carol"):
        assert limiter.running(f"tenant:{tenant}") == 0
    assert scheduler.in_flight() == 0


def test_a_hint_says_when_a_concurrency_cap_binds(scheduler: FairScheduler) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("tenant:acme", 1)
    assert scheduler.hint("acme", queue="q").allowed
    held = lim.acquire("acme", "q", hold=600)
    hint = scheduler.hint("acme", queue="q")
    assert not hint.allowed
    assert hint.concurrency is True
    assert hint.denied_by == "tenant:acme"
    assert 0 < hint.wait_ms <= 600_000
    assert "concurrency" not in hint.as_header(), "the header keeps its shape"
    assert lim.running("tenant:acme") == 1, "a hint takes no slot"
    lim.release(held)


def test_scripts_without_functions_schedule_under_caps_alike(scheduler: FairScheduler) -> None:
    """The same flow as EVALSHA scripts (servers without Redis Functions)."""
    lim = scheduler.limiter
    lim._scripts.transport = "evalsha"
    lim.set_concurrency("tenant:*", 1)
    submit(scheduler, "acme", 2)
    (item,) = scheduler.dispatch(["q"], max_items=5).items
    assert item.slot is not None
    assert "acme" in parked(scheduler, "q")
    assert scheduler.extend(item) is True
    assert scheduler.ack(item) is True
    assert parked(scheduler, "q")["acme"] == 0
    (second,) = scheduler.dispatch(["q"], max_items=5).items
    assert scheduler.nack(second, requeue=False) is True
    verdict = scheduler.gate("acme", "g-1", queue="q2")
    assert verdict.slot is not None
    assert lim.release(verdict.slot) is True
    assert lim._scripts.transport == "evalsha"


def test_a_shorter_wait_does_not_cut_a_longer_waiters_registration(
    scheduler: FairScheduler,
) -> None:
    lim = scheduler.limiter
    lim.set_concurrency("tenant:acme", 2)
    first = lim.acquire("acme", hold=3600)
    second = lim.acquire("acme", hold=3600)
    assert first.slot is not None
    assert second.slot is not None
    submit(scheduler, "acme", 1, queue="a")
    assert scheduler.dispatch(["a"]).items == ()  # parked in lane a for about an hour
    waiters = lim.keys.waiters("tenant:acme")
    assert scheduler.client.pttl(waiters) > 3_600_000
    # The second slot's lease now ends in 10 s: lane b parks acme for 10 s only.
    slots = lim.keys.slots("tenant:acme")
    soon = server_ms(scheduler.client) * 1000 + 10_000_000
    scheduler.client.zadd(slots, {second.slot.token: soon}, xx=True)
    assert scheduler.submit("acme", "b-0", queue="b")
    assert scheduler.dispatch(["b"]).items == ()
    assert scheduler.client.smembers(waiters) == {b"a acme", b"b acme"}
    assert scheduler.client.pttl(waiters) > 3_000_000, "lane a still waits for a release"
    assert lim.release(first)
    assert scheduler.client.exists(waiters) == 0
    assert parked(scheduler, "a")["acme"] == 0
    assert parked(scheduler, "b")["acme"] == 0


def test_an_ack_that_keeps_the_slot_leaves_it_for_the_running_job(
    scheduler: FairScheduler,
) -> None:
    """Work acknowledged when it starts (Celery's default) keeps its slot until it ends."""
    lim = scheduler.limiter
    lim.set_concurrency("tenant:acme", 1)
    submit(scheduler, "acme", 2)
    (first,) = scheduler.dispatch(["q"], max_items=10).items
    assert scheduler.ack(first, keep_slot=True) is True
    assert scheduler.in_flight() == 0
    assert lim.running("tenant:acme") == 1, "still running: the slot is held"
    assert scheduler.dispatch(["q"]).items == ()
    assert first.slot is not None
    assert lim.extend_slot(first.slot, hold=60)
    assert lim.release(first.slot) is True
    assert lim.release(first.slot) is False, "given back once"
    assert [i.id for i in scheduler.dispatch(["q"]).items] == ["acme-1"]
