"""A Redis Cluster primary that stops answering is an outage for its shards' tenants only.

A real Celery worker (Redis broker) gates a namespace of 3 shards on a cluster of its own
(``cluster-require-full-coverage no``), with ``fail_mode="closed"``. One primary is
SIGSTOPped: the tenants whose shards live on the other primaries must keep running (decided,
parked, re-admitted and settled there) while it is stopped, and the stopped primary's
tenants must not run at all (closed); after SIGCONT every job runs exactly once.
Executions are recorded on the plain test Redis, stamped with its clock.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from celery_harness import E2E, opened_e2e, redis_broker_url, wait_for
from conftest import RedisProcess, cleanup_sharded, tenants_on
from e2e_support import assert_cap

from queue_ratelimit import FairScheduler, Limit, Limiter

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

RATE, BURST = 5, 2  # each tenant's limit: most of its jobs are parked and re-admitted
HEALTHY_JOBS = 8  # per healthy tenant
STOPPED_JOBS = 4  # fewer than the worker's prefetch window (held there while closed)
DUE = 3  # seconds after publishing (see below)


@pytest.fixture
def e2e(
    redis_url: str,
    partial_cluster: list[RedisProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[E2E]:
    url = f"redis+cluster://127.0.0.1:{partial_cluster[0].port}/0"
    fields = {"broker": redis_broker_url(redis_url), "redis_url": url, "record_url": redis_url}
    settings = {"shards": 3, "fail_mode": "closed", "credit": 0}
    with opened_e2e(request, **fields, workdir=tmp_path, settings=settings) as env:
        yield env
        sharded = Limiter.from_url(url, namespace=env.namespace, shards=3)
        cleanup_sharded(sharded.client, env.namespace)
        sharded.close()


class Layout(NamedTuple):
    sharded: Any  # the namespace's limiter on the cluster
    stopped_tenant: str  # a tenant whose shard lives on ``stopped``
    healthy: list[str]  # a tenant on each other primary
    stopped: RedisProcess  # the primary the test stops


def layout(e2e: E2E, partial_cluster: list[RedisProcess]) -> Layout:
    """The namespace's limits set, and a tenant on each primary (the first to be stopped)."""
    sharded: Any = Limiter.from_url(e2e.redis_url, namespace=e2e.namespace, shards=3)
    sharded.set_limit("tenant:*", Limit(RATE, burst=BURST))
    tenants = [tenants_on(sharded, shard)[0] for shard in range(3)]
    ports = [int(sharded.client.get_node_from_key(k.config).port) for k in sharded.shard_keys]
    assert sorted(ports) == sorted(n.port for n in partial_cluster), "one shard per primary"
    stopped = next(n for n in partial_cluster if n.port == ports[0])
    assert stopped.proc is not None
    return Layout(sharded, tenants[0], tenants[1:], stopped)


def assert_each_ran_once(e2e: E2E, layout: Layout, owner: dict[str, str]) -> None:
    """After the resume: every job ran, exactly once, and nothing is left in Redis."""
    e2e.wait_ids(set(owner), timeout=90, what="every job after the resume")
    scheduler = FairScheduler(layout.sharded)
    wait_for(lambda: scheduler.in_flight() == 0 and scheduler.backlog(e2e.queue) == 0,
             timeout=30, what="nothing parked or in flight", on_timeout=e2e.logs)  # fmt: skip
    counts = Counter(r["id"] for r in e2e.runs())
    assert set(counts) == set(owner)
    assert all(n == 1 for n in counts.values()), {i: n for i, n in counts.items() if n > 1}


def test_a_stopped_primary_holds_only_its_own_tenants(
    e2e: E2E, partial_cluster: list[RedisProcess]
) -> None:
    sharded, stopped_tenant, healthy, stopped = lay = layout(e2e, partial_cluster)
    assert stopped.proc is not None
    e2e.start_workers("w1")
    work = e2e.app().tasks["e2e.work"]

    # Published before the stop (the producer's hint asks the tenant's primary), due a
    # moment after it: the gate decides every job while the primary is stopped. The
    # stopped primary's tenant first: its jobs meet the outage before the others'.
    owner = {work.apply_async(("p",), rate_tenant=stopped_tenant, countdown=DUE).id:
             stopped_tenant for _ in range(STOPPED_JOBS)}  # fmt: skip
    for _ in range(HEALTHY_JOBS):
        for tenant in healthy:
            owner[work.apply_async(("h",), rate_tenant=tenant, countdown=DUE).id] = tenant
    stopped.proc.send_signal(signal.SIGSTOP)
    try:
        healthy_ids = {i for i, t in owner.items() if t != stopped_tenant}
        rows = e2e.wait_ids(healthy_ids, timeout=90, what="every healthy tenant's job")
        # Still stopped: nothing of its tenant ran (closed), everything of the others did.
        assert not [r for r in rows if r["tenant"] == stopped_tenant], rows
    finally:
        stopped.proc.send_signal(signal.SIGCONT)
    for tenant in healthy:
        assert_cap([r["t"] for r in rows if r["tenant"] == tenant], RATE, BURST, tenant)

    assert_each_ran_once(e2e, lay, owner)
    sharded.close()


# The worker's prefetch window: concurrency 1 x worker_prefetch_multiplier 4
# (tests/celery_e2e_app.py); what the closed fail mode may hold past it (``max_held``).
WINDOW = MAX_HELD = 4


def test_a_stopped_primarys_messages_past_the_prefetch_window_do_not_stall_the_others(
    e2e: E2E, partial_cluster: list[RedisProcess]
) -> None:
    """More of the stopped primary's tenant's messages than the prefetch window, published
    first: the gate keeps each one (closed) and, as other primaries answer, raises the
    window for it (up to max_held), so the broker goes on delivering the healthy tenants'
    messages behind them. (They used to fill the window: nothing else came until SIGCONT.)"""
    sharded, stopped_tenant, healthy, stopped = lay = layout(e2e, partial_cluster)
    assert stopped.proc is not None
    e2e.settings["max_held"] = MAX_HELD
    e2e.start_workers("w1", concurrency=1)
    # No hints: the producer then asks no Redis, so it publishes while the primary is
    # stopped; the messages arrive at the gate in the order published.
    work = e2e.app(hints=False).tasks["e2e.work"]
    stopped.proc.send_signal(signal.SIGSTOP)
    try:
        owner = {work.apply_async(("p",), rate_tenant=stopped_tenant).id: stopped_tenant
                 for _ in range(WINDOW + MAX_HELD // 2)}  # fmt: skip
        for _ in range(HEALTHY_JOBS // 2):
            for tenant in healthy:
                owner[work.apply_async(("h",), rate_tenant=tenant).id] = tenant
        healthy_ids = {i for i, t in owner.items() if t != stopped_tenant}
        rows = e2e.wait_ids(healthy_ids, timeout=30, what="every healthy tenant's job")
        assert not [r for r in rows if r["tenant"] == stopped_tenant], rows
    finally:
        stopped.proc.send_signal(signal.SIGCONT)
    assert_each_ran_once(e2e, lay, owner)
    sharded.close()
