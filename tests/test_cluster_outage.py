"""A stopped primary of a Redis Cluster is an outage for the calls to its slots: the fail
mode decides them, and nothing raises the cluster client's own exceptions (which are not
Redis errors, so no handler of Redis's errors would catch them)."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator

import pytest
from conftest import RedisProcess
from redis.exceptions import RedisClusterException

from queue_ratelimit import BackendUnavailable, FairScheduler, Limit, Limiter


@pytest.fixture
def stopped_primary(partial_cluster: list[RedisProcess]) -> Iterator[tuple[Limiter, str]]:
    """A 3-shard limiter on the cluster, and a tenant whose shard's primary is stopped."""
    url = f"redis+cluster://127.0.0.1:{partial_cluster[0].port}/0"
    limiter = Limiter.from_url(url, namespace=f"o{uuid.uuid4().hex[:8]}", shards=3, timeout=1)
    limiter.set_limit("tenant:*", Limit(100, burst=100))
    # A tenant on the node the URL names (the client's way in when it looks for the slots).
    stopped = partial_cluster[0]

    def port_of(tenant: str) -> int:
        key = limiter.shard_keys[limiter.shard_of(tenant)].config
        return int(limiter.client.get_node_from_key(key).port)

    tenant = next(t for t in (f"t{i}" for i in range(1000)) if port_of(t) == stopped.port)
    assert limiter.acquire(tenant).allowed
    stopped.proc.send_signal(signal.SIGSTOP)
    try:
        yield limiter, tenant
    finally:
        stopped.proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("call", ["acquire", "hint"])
def test_a_stopped_primary_is_an_outage_not_a_cluster_exception(
    stopped_primary: tuple[Limiter, str], call: str
) -> None:
    limiter, tenant = stopped_primary
    for _ in range(10):  # (the first waits out its timeout; the next find the node down)
        try:
            if call == "acquire":
                limiter.acquire(tenant)
            else:
                FairScheduler(limiter).hint(tenant, queue="q")
        except BackendUnavailable:
            continue
        except RedisClusterException as exc:
            pytest.fail(f"{call} raised the cluster client's {exc!r}")


@pytest.fixture
def url_of_a_stopped_node(partial_cluster: list[RedisProcess]) -> Iterator[str]:
    """A cluster URL naming a node that is stopped (the client's only way in)."""
    node = partial_cluster[0]
    node.proc.send_signal(signal.SIGSTOP)
    try:
        yield f"redis+cluster://127.0.0.1:{node.port}/0"
    finally:
        node.proc.send_signal(signal.SIGCONT)


def test_a_client_whose_way_in_is_stopped_is_an_outage(url_of_a_stopped_node: str) -> None:
    with pytest.raises(BackendUnavailable, match="Redis Cluster"):
        Limiter.from_url(url_of_a_stopped_node, namespace="o", shards=3, timeout=0.5)


def test_a_publish_goes_out_while_the_cluster_cannot_be_reached(url_of_a_stopped_node: str) -> None:
    """The producer's hint builds the limiter on its first publish: a cluster it cannot
    reach then costs the hint, never the publish."""
    from celery import Celery

    from queue_ratelimit.celery import install

    app = Celery(f"outage{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    install(app, redis_url=url_of_a_stopped_node, shards=3, hints=True)

    @app.task(name="t.work")
    def work(x: int) -> int:
        return x

    sent = []
    with app.connection_for_write() as conn:
        for _ in range(2):  # (the task's own apply_async asks for the hint at the call)
            sent.append(work.apply_async(args=[1], connection=conn, rate_tenant="acme"))
        with conn.SimpleQueue("celery") as queue:
            assert queue.qsize() == 2
    assert all(r.id for r in sent)


def test_a_stopped_way_in_does_not_hold_the_other_primaries_tenants(
    stopped_primary: tuple[Limiter, str],
) -> None:
    """The stopped primary is the node the URL names (the client's default node): redis-py
    asked it for every ``FCALL``'s keys (``COMMAND GETKEYS``) before sending the call to
    the key's own primary, so every tenant, on whichever primary, met its outage."""
    limiter, tenant = stopped_primary
    with pytest.raises(BackendUnavailable):  # (waits out its timeout: the node is down)
        limiter.acquire(tenant)
    stopped_port = limiter.client.get_node_from_key(
        limiter.shard_keys[limiter.shard_of(tenant)].config
    ).port
    others = [
        t
        for t in (f"t{i}" for i in range(1000))
        if limiter.client.get_node_from_key(limiter.shard_keys[limiter.shard_of(t)].config).port
        != stopped_port
    ][:10]
    assert [limiter.acquire(t).allowed for t in others] == [True] * len(others)
    assert limiter._scripts.transport == "fcall"  # (what redis-py looked the keys of up)


def test_a_cluster_client_made_elsewhere_reads_its_script_keys_too(
    partial_cluster: list[RedisProcess],
) -> None:
    """``Limiter(RedisCluster(...))``: a client the caller built reads an ``FCALL``'s keys
    from its arguments as ours does, so its default node stopped holds no other tenant."""
    from redis.cluster import RedisCluster

    stopped = partial_cluster[0]  # (the client's way in, its default node)
    client = RedisCluster(
        host="127.0.0.1", port=stopped.port, socket_timeout=1, socket_connect_timeout=1
    )
    limiter = Limiter(client, namespace=f"e{uuid.uuid4().hex[:8]}", shards=3)
    limiter.set_limit("tenant:*", Limit(100, burst=100))

    def port_of(tenant: str) -> int:
        key = limiter.shard_keys[limiter.shard_of(tenant)].config
        return int(client.get_node_from_key(key).port)

    others = [t for t in (f"t{i}" for i in range(1000)) if port_of(t) != stopped.port][:10]
    assert all(limiter.acquire(t).allowed for t in others)  # (each primary has the scripts)
    stopped.proc.send_signal(signal.SIGSTOP)
    try:
        assert [limiter.acquire(t).allowed for t in others] == [True] * len(others)
    finally:
        stopped.proc.send_signal(signal.SIGCONT)
        client.close()
