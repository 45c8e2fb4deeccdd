"""``FairScheduler`` under several worker processes dispatching at once from one Redis."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter

import pytest
import redis
from conftest import wait_until

from queue_ratelimit import FairScheduler, Limit, Limiter

WORKERS = 8
RUN_SECONDS = 3.0
RATE, BURST = 300.0, 20.0
# tenant -> (weight, {priority: items queued}); every class has more work than it can get.
PLAN = {
    "acme": (1.0, {"high": 1000, "low": 1000}),
    "noisy": (1.0, {"normal": 3000}),
    "premium": (2.0, {"normal": 1500}),
}


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def _worker(url: str, namespace: str, go_key: str, ready_key: str) -> list[tuple[str, str, str]]:
    """Dispatch and ack until the run ends; return (id, tenant, priority) of what it got."""
    client = redis.Redis.from_url(url)
    scheduler = FairScheduler(Limiter(client, namespace=namespace))
    got: list[tuple[str, str, str]] = []
    client.incr(ready_key)
    while not client.exists(go_key):
        time.sleep(0.005)
    end = time.monotonic() + RUN_SECONDS
    while time.monotonic() < end:
        result = scheduler.dispatch(["default"], max_items=2)
        for item in result.items:
            got.append((item.id, item.tenant, item.priority))
            assert scheduler.ack(item.id)
        if not result.items:
            # A worker would sleep this long; capped so the run ends on time.
            time.sleep(min(result.wait_ms or 0, 20.0) / 1000)
    client.close()
    return got


@pytest.mark.slow
def test_eight_processes_share_a_global_cap_fairly(
    redis_url: str, redis_client: redis.Redis, limiter: Limiter
) -> None:
    scheduler = FairScheduler(limiter)
    limiter.set_limit("global", Limit(RATE, burst=BURST))
    submitted: set[str] = set()
    pipe = redis_client.pipeline(transaction=False)
    for tenant, (weight, classes) in PLAN.items():
        scheduler.set_tenant_weight(tenant, weight)
        for priority, count in classes.items():
            for n in range(count):
                item_id = f"{tenant}.{priority}.{n}"
                submitted.add(item_id)
                scheduler.submit(tenant, item_id, priority=priority, pipeline=pipe)
    assert set(pipe.execute()) == {1}
    go_key = f"{limiter.keys.base}:test:go"
    ready_key = f"{limiter.keys.base}:test:ready"

    context = multiprocessing.get_context("spawn")
    with context.Pool(WORKERS) as pool:
        pending = pool.starmap_async(
            _worker, [(redis_url, limiter.namespace, go_key, ready_key)] * WORKERS
        )
        wait_until(
            lambda: int(redis_client.get(ready_key) or 0) == WORKERS,
            timeout=120,
            what="every worker process to start",
        )
        started = _redis_now(redis_client)
        redis_client.set(go_key, "1")
        results = pending.get(timeout=120)
        finished = _redis_now(redis_client)

    dispatched = [item for worker in results for item in worker]
    ids = [item_id for item_id, _, _ in dispatched]
    # Every item at most once, none lost: what was not dispatched is still queued.
    assert len(ids) == len(set(ids))
    assert set(ids) <= submitted
    assert scheduler.in_flight() == 0
    assert scheduler.backlog("default") == len(submitted) - len(ids)
    # The hard cap: at most R*T + B over the whole run, on Redis's clock.
    elapsed = finished - started
    assert len(ids) <= RATE * elapsed + BURST
    assert len(ids) > BURST, "the run must last long enough for the bucket to refill"
    # Weighted shares: tenants 1:1:2, and inside acme high:low 3:1 (loose: +-15%).
    tenants = Counter(tenant for _, tenant, _ in dispatched)
    quarter = len(ids) / 4
    for tenant, expected in (("acme", quarter), ("noisy", quarter), ("premium", 2 * quarter)):
        assert abs(tenants[tenant] - expected) <= 0.15 * expected, tenants
    acme = Counter(priority for _, tenant, priority in dispatched if tenant == "acme")
    assert 3 * 0.85 <= acme["high"] / acme["low"] <= 3 * 1.15, acme
