"""A Redis that evicts keys (issue #11, finding 13): no script fails on a missing key, lost
items are counted, what survives is dispatched exactly once, and the limiter warns about (or
refuses) an evicting server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis
import redis.asyncio as aioredis
from conftest import RedisProcess
from fastapi.testclient import TestClient

from queue_ratelimit import AsyncLimiter, ConfigError, FairScheduler, Limiter
from queue_ratelimit._durability import EvictionStatus
from queue_ratelimit.admin import create_app
from queue_ratelimit.celery._settings import CelerySettings
from queue_ratelimit.metrics import RateLimitCollector, snapshot
from queue_ratelimit.rq import _options
from queue_ratelimit.tui import build_view

LANE = "q"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- one key gone at a time (table-driven) ---------------------------------------------------
@dataclass(frozen=True)
class Gone:
    """A key deleted while a1 and b1 are in flight and a2, a3, b2, b3 wait."""

    name: str
    key: Callable[[FairScheduler], str]
    lost: int  # items counted as lost
    served: frozenset[str]  # waiting items dispatched afterwards


ALL_WAITING = frozenset({"a2", "a3", "b2", "b3"})
CASES = [
    Gone("meta", lambda s: s.keys.meta, 4, frozenset()),
    Gone("payload", lambda s: s.keys.payload, 4, frozenset()),
    Gone("active", lambda s: s.keys.active(LANE), 0, ALL_WAITING),
    Gone("classes", lambda s: s.keys.classes(LANE, "a"), 2, frozenset({"b2", "b3"})),
    Gone("backlog", lambda s: s.keys.backlog(LANE, "a", "normal"), 2, frozenset({"b2", "b3"})),
    Gone("counts", lambda s: s.keys.counts(LANE), 0, ALL_WAITING),
    Gone("age", lambda s: s.keys.age(LANE), 0, ALL_WAITING),
    Gone("inflight", lambda s: s.keys.inflight, 0, ALL_WAITING),
    Gone("lease", lambda s: s.keys.lease, 0, ALL_WAITING),
    Gone("lanes", lambda s: s.keys.lanes, 0, ALL_WAITING),
    Gone("tenant hash", lambda s: s.keys.tenant("a"), 0, ALL_WAITING),
    Gone("config", lambda s: s.keys.config, 0, ALL_WAITING),
    Gone("shared", lambda s: s.keys.shared, 0, ALL_WAITING),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_missing_key_never_breaks_the_lane(limiter: Limiter, case: Gone) -> None:
    scheduler = FairScheduler(limiter, lease=30)
    for item_id in ("a1", "a2", "a3", "b1", "b2", "b3"):
        assert scheduler.submit(item_id[0], item_id, queue=LANE, payload=f"p-{item_id}".encode())
    in_flight = scheduler.dispatch([LANE], max_items=2).items
    assert {i.id for i in in_flight} == {"a1", "b1"}

    limiter.client.delete(case.key(scheduler))

    # The holders of the two in-flight items still close them.
    for item in in_flight:
        assert scheduler.ack(item, remember=60)
    served = []
    for _ in range(10):
        batch = scheduler.dispatch([LANE], max_items=3)
        for item in batch.items:
            assert item.payload == f"p-{item.id}".encode()
            assert scheduler.ack(item)
            served.append(item.id)
        if batch.wait_ms is None:
            break
    assert len(served) == len(set(served)), "dispatched twice"
    assert set(served) == case.served
    assert scheduler.lost() == case.lost
    assert scheduler.backlog(LANE) == 0
    assert scheduler.in_flight() == 0
    # The lane works as before: a gate call, a new item.
    assert scheduler.gate("c", "c0", queue=LANE).action == "run"
    assert scheduler.submit("c", "c1", queue=LANE, payload=b"p-c1")
    assert [i.id for i in scheduler.dispatch([LANE]).items] == ["c1"]


def test_stranded_tenants_rejoin_even_when_the_total_says_nothing_waits(
    limiter: Limiter,
) -> None:
    """The schedule evicted and the lane total already driven to 0 (counts recreated by
    later work, then served): the tenants named by the counts still come back."""
    scheduler = FairScheduler(limiter, lease=30)
    for item_id in ("a1", "a2", "b1"):
        scheduler.submit(item_id[0], item_id, queue=LANE, payload=b"x")
    limiter.client.delete(scheduler.keys.active(LANE))
    limiter.client.hset(scheduler.keys.counts(LANE), ":total", 0)
    served = {i.id for i in scheduler.dispatch([LANE], max_items=5).items}
    served |= {i.id for i in scheduler.dispatch([LANE], max_items=5).items}
    assert served == {"a1", "a2", "b1"}
    assert scheduler.lost() == 0


@pytest.mark.parametrize("how", ["reap", "requeue"])
def test_an_item_back_from_flight_without_its_record_is_lost_not_fatal(
    limiter: Limiter, how: str
) -> None:
    scheduler = FairScheduler(limiter, lease=30)
    scheduler.submit("a", "a1", queue=LANE, payload=b"x")
    scheduler.submit("a", "a2", queue=LANE, payload=b"y")
    (item,) = scheduler.dispatch([LANE]).items
    limiter.client.hdel(scheduler.keys.meta, item.id)
    if how == "reap":
        limiter.client.zadd(scheduler.keys.inflight, {item.id: 0})  # its lease ran out
        assert scheduler.reap() == 1
    else:
        assert scheduler.nack(item, requeue=True, refund=True)
    assert scheduler.lost() == 1
    assert [i.id for i in scheduler.dispatch([LANE], max_items=5).items] == ["a2"]
    assert limiter.client.hexists(scheduler.keys.payload, item.id) == 0


def test_slots_and_waiters_may_vanish(limiter: Limiter) -> None:
    scheduler = FairScheduler(limiter, lease=30)
    limiter.set_concurrency("tenant:*", 1)
    for item_id in ("a1", "a2"):
        scheduler.submit("a", item_id, queue=LANE)
    (first,) = scheduler.dispatch([LANE], max_items=2).items  # a2 parked by the cap
    assert first.slot is not None
    limiter.client.delete(limiter.keys.slots("tenant:a"), limiter.keys.waiters("tenant:a"))
    assert not limiter.release(first.slot)  # already gone: nothing to give back
    assert scheduler.ack(first)
    # Released with nobody to wake, a2 waits until its parked time, then runs.
    limiter.client.zadd(scheduler.keys.parked(LANE), {"a": 0})
    assert [i.id for i in scheduler.dispatch([LANE]).items] == ["a2"]


# -- a real evicting Redis: the reproduction of issue #11, finding 13 -------------------------
@pytest.fixture
def evicting(redis_process: Callable[..., RedisProcess]) -> Iterator[redis.Redis]:
    """A Redis of the test's own with 8 MB of memory and allkeys-lru, as a cache would be."""
    server = redis_process(extra=["--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru"])
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


def _flood(scheduler: FairScheduler) -> set[str]:
    """2,000 submits of 10 KB for 50 tenants, all accepted (the server evicts to make room):
    the reproduction, one call each as a producer would."""
    ids = set()
    for n in range(2000):
        item_id = f"job-{n}"
        ids.add(item_id)
        payload = item_id.encode().ljust(10_000, b".")
        assert scheduler.submit(f"t{n % 50}", item_id, queue=LANE, payload=payload)
    return ids


def _listed(scheduler: FairScheduler) -> dict[str, bool]:
    """The waiting items dispatch can find (tenants scheduled or named by the counts, their
    classes, each class's list), and whether each still has its record and payload."""
    client, keys = scheduler.client, scheduler.keys
    tenants = {_text(t) for t in client.zrange(keys.active(LANE), 0, -1)}
    tenants |= {_text(t) for t in client.zrange(keys.parked(LANE), 0, -1)}
    tenants |= {_text(t) for t in client.hkeys(keys.counts(LANE)) if not _text(t).startswith(":")}
    found = {}
    for tenant in tenants:
        for priority in client.zrange(keys.classes(LANE, tenant), 0, -1):
            for raw in client.lrange(keys.backlog(LANE, tenant, _text(priority)), 0, -1):
                item_id = _text(raw)
                found[item_id] = bool(
                    client.hexists(keys.meta, item_id) and client.hexists(keys.payload, item_id)
                )
    return found


def _drain(scheduler: FairScheduler, *, evicting: bool = False) -> list[str]:
    """Dispatch and ack until the lane is empty. While the server still evicts, an ack may
    find its in-flight records gone (then it says False): only the dispatch must hold."""
    served: list[str] = []
    for _ in range(200):  # 2,000 items at 100 per call: a bound, never reached
        batch = scheduler.dispatch([LANE], max_items=100)
        for item in batch.items:
            assert item.payload == item.id.encode().ljust(10_000, b".")
            assert scheduler.ack(item) or evicting
            served.append(item.id)
        if batch.wait_ms is None:
            return served
    pytest.fail("the lane never emptied")


def test_evicted_parked_work_is_counted_and_the_rest_dispatched_once(
    evicting: redis.Redis,
) -> None:
    scheduler = FairScheduler(Limiter(evicting, namespace="evict", eviction="ignore"))
    submitted = _flood(scheduler)
    assert evicting.info("stats")["evicted_keys"] > 0
    # Eviction stops (as when an operator raises the limit): what survived is now fixed.
    evicting.config_set("maxmemory", 0)
    listed = _listed(scheduler)
    survivors = {item_id for item_id, whole in listed.items() if whole}

    served = _drain(scheduler)  # before: ResponseError "bad argument #1 to 'match'"

    assert len(served) == len(set(served)), "an item was dispatched twice"
    assert set(served) == survivors, "each item whose data survived, once"
    assert scheduler.lost() >= len(listed) - len(survivors), "each one found without, counted"
    assert scheduler.lost() + len(served) <= len(submitted)
    assert scheduler.backlog(LANE) == 0
    # The lane takes new work. (It may bring back items of its tenant that no index named
    # any more, found in a class list it reuses: those ran nowhere yet, and run once now.)
    scheduler.submit("t0", "after", queue=LANE, payload=b"after".ljust(10_000, b"."))
    later = _drain(scheduler)
    assert "after" in later
    assert not set(later) & set(served)
    assert set(later) <= submitted | {"after"}


def test_dispatch_keeps_going_while_the_server_keeps_evicting(evicting: redis.Redis) -> None:
    scheduler = FairScheduler(Limiter(evicting, namespace="evict", eviction="ignore"))
    submitted = _flood(scheduler)
    served = _drain(scheduler, evicting=True)  # (each dispatch and ack may evict more)
    assert len(served) == len(set(served))
    assert set(served) <= submitted
    assert scheduler.backlog(LANE) == 0


# -- the eviction policy check ----------------------------------------------------------------
def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "evicts keys" in r.getMessage()]


def test_an_evicting_server_is_reported_once_at_the_first_call(
    evicting: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = Limiter(evicting, namespace="warned")
    assert limiter.eviction_status() == EvictionStatus("allkeys-lru", 8 * 1024 * 1024)
    with caplog.at_level(logging.WARNING, logger="queue_ratelimit"):
        limiter.acquire("acme")
        limiter.acquire("acme")
        FairScheduler(limiter).submit("acme", "one")
    (warning,) = _warnings(caplog)
    assert "allkeys-lru" in warning
    assert "parked jobs" in warning


def test_refuse_raises_on_every_call(evicting: redis.Redis) -> None:
    limiter = Limiter(evicting, namespace="refused", eviction="refuse")
    for _ in range(2):
        with pytest.raises(ConfigError, match="eviction='refuse'"):
            limiter.acquire("acme")
    assert evicting.exists(limiter.keys.shared) == 0, "nothing was written"


def test_ignore_and_a_safe_server_say_nothing(
    evicting: redis.Redis, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="queue_ratelimit"):
        Limiter(evicting, namespace="quiet", eviction="ignore").acquire("acme")
        safe = Limiter(redis_client, namespace="safe", eviction="refuse")
        safe.acquire("acme")
    assert _warnings(caplog) == []
    assert not safe.eviction_status().evicting
    redis_client.delete(*redis_client.keys(f"{safe.keys.base}:*"))


def test_volatile_policies_warn_about_keys_with_a_ttl(
    evicting: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    evicting.config_set("maxmemory-policy", "volatile-lru")
    with caplog.at_level(logging.WARNING, logger="queue_ratelimit"):
        Limiter(evicting, namespace="volatile").acquire("acme")
    (warning,) = _warnings(caplog)
    assert "volatile-lru" in warning
    assert "keys with a TTL" in warning


def test_no_memory_limit_means_no_eviction(evicting: redis.Redis) -> None:
    evicting.config_set("maxmemory", 0)
    assert not Limiter(evicting, namespace="x").eviction_status().evicting


@pytest.mark.parametrize(
    ("denied", "expected"),
    [
        ("-info", EvictionStatus("allkeys-lru", 8 * 1024 * 1024)),  # CONFIG GET answers
        ("-info -config", EvictionStatus(None, None)),  # unknown: no warning, no error
    ],
)
def test_a_server_that_refuses_info_or_config_is_tolerated(
    evicting: redis.Redis, denied: str, expected: EvictionStatus
) -> None:
    rules = ["on", ">pw", "~*", "&*", "+@all", *denied.split()]
    evicting.execute_command("ACL", "SETUSER", "app", *rules)
    port = evicting.connection_pool.connection_kwargs["port"]
    client = redis.Redis(port=port, username="app", password="pw")
    limiter = Limiter(client, namespace="acl", eviction="refuse")
    assert limiter.eviction_status() == expected
    if expected.evicting:
        with pytest.raises(ConfigError):
            limiter.acquire("acme")
    else:
        assert limiter.acquire("acme").allowed
    client.close()


def test_the_async_limiter_checks_too(evicting: redis.Redis) -> None:
    port = evicting.connection_pool.connection_kwargs["port"]

    async def first_call() -> None:
        client = aioredis.Redis(port=port)
        limiter = AsyncLimiter(client, namespace="async", eviction="refuse")
        try:
            assert (await limiter.eviction_status()).evicting
            with pytest.raises(ConfigError):
                await limiter.acquire("acme")
        finally:
            await client.aclose()

    asyncio.run(first_call())


def test_bad_eviction_setting(redis_client: redis.Redis) -> None:
    with pytest.raises(ConfigError, match="eviction must be"):
        Limiter(redis_client, eviction="sometimes")  # type: ignore[arg-type]


# -- where the setting and the status show ---------------------------------------------------
def test_healthz_reports_the_eviction_policy(evicting: redis.Redis) -> None:
    limiter = Limiter(evicting, namespace="health", eviction="ignore")
    with TestClient(create_app(limiter, token="t")) as api:
        body = api.get("/healthz").json()
    assert body["status"] == "ok"
    assert body["eviction"] == {
        "policy": "allkeys-lru",
        "maxmemory": 8 * 1024 * 1024,
        "evicting": True,
    }


def test_the_integrations_take_the_setting(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert CelerySettings(redis_url="redis://x", eviction="refuse").eviction == "refuse"
    with pytest.raises(ConfigError, match="eviction must be"):
        CelerySettings(redis_url="redis://x", eviction="never")  # type: ignore[arg-type]
    monkeypatch.setenv(_options.ENV_EVICTION, "ignore")
    assert _options.scheduler_for(redis_client, "rq-evict").limiter.eviction == "ignore"
    monkeypatch.setenv(_options.ENV_EVICTION, "maybe")
    with pytest.raises(ConfigError, match="eviction must be"):
        _options.eviction()


def test_top_and_the_metrics_show_eviction_and_lost_items(evicting: redis.Redis) -> None:
    limiter = Limiter(evicting, namespace="shown", eviction="ignore")
    scheduler = FairScheduler(limiter)
    scheduler.submit("a", "a1", queue=LANE, payload=b"x")
    evicting.delete(scheduler.keys.payload)
    assert scheduler.dispatch([LANE]).items == ()
    snap = snapshot(limiter)
    assert snap["eviction"]["evicting"]
    assert snap["totals"]["lost"] == 1
    view = build_view(snap, None)
    assert "REDIS EVICTS KEYS (allkeys-lru)" in view.title
    assert ("LOST (evicted)", "", "1") in view.decisions
    families = {m.name: m for m in RateLimitCollector(limiter).collect()}
    assert families["queue_ratelimit_lost"].samples[0].value == 1
    assert families["queue_ratelimit_redis_evicting"].samples[0].value == 1
