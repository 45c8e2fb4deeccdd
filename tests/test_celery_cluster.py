"""The Celery integration with its limiter on a real three-primary Redis Cluster.

Workers and producers are given ``redis+cluster://`` and ``shards=3``: the namespace's shards
live on every primary, and the gate's calls go over one connection per primary (``ClusterWire``).
Executions are recorded on the plain test Redis (the records are no part of the limiter).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery_harness import E2E, opened_e2e, wait_for
from conftest import RedisProcess, cleanup_sharded
from test_celery_e2e import broker, run_under_sharded_caps  # noqa: F401 (a fixture)

from queue_ratelimit import FairScheduler, Limit, Limiter
from queue_ratelimit.celery import last_hint

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def e2e(
    broker: str,  # noqa: F811 (the fixture imported above)
    redis_url: str,
    cluster_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[E2E]:
    fields = {"broker": broker, "redis_url": cluster_url, "record_url": redis_url}
    with opened_e2e(request, **fields, workdir=tmp_path, settings={"shards": 3}) as env:
        yield env
        sharded = Limiter.from_url(cluster_url, namespace=env.namespace, shards=3)
        cleanup_sharded(sharded.client, env.namespace)
        sharded.close()


def sharded_limiter(e2e: E2E) -> Any:
    return Limiter.from_url(e2e.redis_url, namespace=e2e.namespace, shards=3)


def gate_counters(e2e: E2E) -> dict[str, dict[str, Any]]:
    """Each of the test's workers' gate counters (``celery inspect stats``; RabbitMQ is
    shared, so only they are asked)."""
    hosts = sorted(e2e.ready_hosts())
    stats = e2e.app().control.inspect(timeout=10, destination=hosts).stats() or {}
    return {host: s["queue_ratelimit"] for host, s in stats.items()}


def test_a_sharded_namespace_on_a_cluster_runs_every_task_once_under_its_caps(
    e2e: E2E, cluster: list[RedisProcess]
) -> None:
    """Two prefork workers gate every task over the cluster: each tenant decided and parked
    on its shard's primary, the global cap sliced between the shards (bound R*T + B + N)."""
    sharded = sharded_limiter(e2e)
    primaries = {int(sharded.client.get_node_from_key(k.config).port) for k in sharded.shard_keys}
    assert primaries == {n.port for n in cluster}, "one shard on each primary"
    run_under_sharded_caps(e2e, sharded, timeout=60)
    scheduler = FairScheduler(sharded)
    wait_for(lambda: scheduler.in_flight() == 0 and scheduler.backlog(e2e.queue) == 0,
             timeout=20, what="nothing parked or in flight", on_timeout=e2e.logs)  # fmt: skip
    counters = gate_counters(e2e)
    assert len(counters) == 2
    # The gate parked and re-admitted over its wire (waited-for calls write nothing on it).
    assert sum(c["parked"] for c in counters.values()) > 0
    assert all(c["redis_writes"] > 0 for c in counters.values()), counters
    # ``celery inspect qrl_gate`` reads every shard's lanes, each on its primary.
    hosts = sorted(e2e.ready_hosts())
    gates = e2e.app().control.inspect(timeout=10, destination=hosts)._request("qrl_gate")
    assert len(gates) == 2
    for reply in gates.values():
        assert "backlog_error" not in reply, reply
        assert reply["queues"][e2e.queue]["waiting"] == 0
    sharded.close()


def test_producer_hints_come_from_the_tenants_shard_on_a_cluster(e2e: E2E) -> None:
    """The publish hook's hint (policy "hint") asks the tenant's shard on its primary."""
    sharded = sharded_limiter(e2e)
    sharded.set_limit("tenant:busy", Limit(1, per=3600, burst=1))
    app = e2e.app()
    work = app.tasks["e2e.work"]
    work.apply_async(("first",), rate_tenant="busy")
    first = last_hint()
    assert first is not None
    assert first.allowed
    second = work.apply_async(("second",), rate_tenant="busy")
    hint = last_hint()
    assert hint is not None
    assert (hint.allowed, hint.denied_by) == (False, "tenant:busy")
    assert hint.wait_ms > 1000
    assert hint.backlog == 1, "the first job, in transit, counted on the tenant's shard"
    assert second.rate_hint == hint
    sharded.close()
