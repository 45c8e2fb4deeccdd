"""The limiter on a real three-master Redis Cluster: every namespace lives in one slot."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import NO_RETRY, REDIS_SERVER, RedisProcess, free_port, wait_until
from redis.cluster import RedisCluster
from redis.crc import key_slot

from queue_ratelimit import CostExceedsBurst, Limit, Limiter, LimitNotFound

pytestmark = pytest.mark.cluster

REDIS_CLI = shutil.which("redis-cli")
HOUR = 3600.0


def cluster_ok(port: int) -> bool:
    probe = redis.Redis(port=port, socket_timeout=1, retry=NO_RETRY)
    try:
        return probe.execute_command("CLUSTER INFO").get("cluster_state") == "ok"
    finally:
        probe.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisProcess]]:
    """Three masters on free loopback ports, no replicas; killed by pid afterwards."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server and redis-cli are needed for a cluster")
    base = tmp_path_factory.mktemp("cluster")
    nodes: list[RedisProcess] = []
    try:
        for i in range(3):
            # A cluster node also listens on port + 10000 (the cluster bus).
            node = RedisProcess(
                Path(base, f"node{i}"),
                port=free_port(also_free=10000),
                extra=["--cluster-enabled", "yes", "--cluster-node-timeout", "3000"],
            )
            nodes.append(node.start())
        create = [REDIS_CLI, "--cluster", "create"]
        create += [f"127.0.0.1:{n.port}" for n in nodes]
        create += ["--cluster-replicas", "0", "--cluster-yes"]
        result = subprocess.run(create, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        for node in nodes:
            wait_until(lambda n=node: cluster_ok(n.port), timeout=30, what="cluster_state:ok")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def cluster_client(cluster: list[RedisProcess]) -> Iterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster[0].port, socket_timeout=5)
    yield client
    client.close()


def owner_port(client: RedisCluster, namespace: str) -> int:
    node = client.get_node_from_key(f"qrl:{{{namespace}}}:config")
    return int(node.port)


def namespaces_on_every_node(client: RedisCluster, ports: set[int]) -> list[str]:
    """One namespace whose slot each master owns, so every node is exercised."""
    found: dict[int, str] = {}
    while set(found) != ports:
        namespace = f"c{uuid.uuid4().hex[:10]}"
        found.setdefault(owner_port(client, namespace), namespace)
    return list(found.values())


def test_cluster_has_three_masters(
    cluster: list[RedisProcess], cluster_client: RedisCluster
) -> None:
    masters = cluster_client.get_primaries()
    assert sorted(int(m.port) for m in masters) == sorted(n.port for n in cluster)


def test_limiter_works_on_every_node(
    cluster: list[RedisProcess], cluster_client: RedisCluster
) -> None:
    ports = {n.port for n in cluster}
    for namespace in namespaces_on_every_node(cluster_client, ports):
        lim = Limiter(cluster_client, namespace=namespace)
        assert lim.set_limit("global", Limit(1, per=HOUR, burst=100)) == 1
        assert lim.set_limit("tenant:*", Limit(1, per=HOUR, burst=2)) == 2
        assert lim.set_limit("tenant:acme:queue:q", Limit(1, per=HOUR, burst=5)) == 3
        assert lim.set_limit("queue:q", Limit(1, per=HOUR, burst=50)) == 4
        first = lim.acquire("acme", queue="q", priority="high")
        assert first.allowed
        assert set(first.remaining) == {"tenant:acme:queue:q", "tenant:acme", "queue:q", "global"}
        assert lim.acquire("acme", queue="q").allowed
        denied = lim.acquire("acme", queue="q")
        assert not denied.allowed
        assert denied.denied_by == "tenant:acme"
        assert lim.peek("beta", queue="q").allowed
        assert lim.refund("acme", queue="q").remaining["tenant:acme"] == pytest.approx(1, abs=0.01)
        with pytest.raises(CostExceedsBurst):
            lim.acquire("acme", cost=3)
        lim.set_exempt("acme", "tenant")
        lim.set_shadow(True)
        assert lim.acquire("beta", cost=3).would_deny == ("tenant:beta",)
        assert lim.get_limit("tenant:*").limit == Limit(1, per=HOUR, burst=2)
        assert list(lim.limits()) == ["global", "queue:q", "tenant:*", "tenant:acme:queue:q"]
        assert lim.delete_limit("queue:q") == 7
        with pytest.raises(LimitNotFound):
            lim.delete_limit("queue:q")
        assert [e.version for e in lim.audit_log(count=3)] == [7, 6, 5]
        assert lim._scripts.transport == "fcall"  # the Functions library, on every primary
        # Every key the limiter wrote sits in the namespace's slot, on the node that owns it.
        owner = redis.Redis(port=owner_port(cluster_client, namespace), retry=NO_RETRY)
        try:
            keys = [k.decode() for k in owner.scan_iter(match=f"qrl:{{{namespace}}}:*")]
            slots = {int(owner.execute_command("CLUSTER KEYSLOT", k)) for k in keys}
            assert len(keys) >= 5
            assert slots == {key_slot(namespace.encode())}
        finally:
            owner.close()
        cluster_client.delete(*keys)


@pytest.mark.parametrize("transport", ["fcall", "evalsha"])
def test_lost_scripts_are_loaded_again_on_a_cluster(
    cluster: list[RedisProcess], cluster_client: RedisCluster, transport: str
) -> None:
    """FUNCTION FLUSH / SCRIPT FLUSH on every node (as after restarts without persistence)."""
    lim = Limiter(cluster_client, namespace=f"c{uuid.uuid4().hex[:10]}")
    lim._scripts.transport = transport  # type: ignore[assignment]
    lim.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2))
    assert lim.acquire("acme").allowed
    for node in cluster:
        direct = redis.Redis(port=node.port, retry=NO_RETRY)
        if transport == "fcall":
            direct.function_flush()
        else:
            direct.script_flush()
        direct.close()
    assert lim.acquire("acme").allowed
    assert not lim.acquire("acme").allowed
    assert lim._scripts.transport == transport
    keys = list(cluster_client.scan_iter(match=f"qrl:{{{lim.namespace}}}:*"))
    for key in keys:
        cluster_client.delete(key)
