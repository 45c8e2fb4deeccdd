"""The limiter on a real three-master Redis Cluster: every namespace lives in one slot."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis
from conftest import NO_RETRY, RedisProcess, cleanup_sharded
from redis.cluster import RedisCluster
from redis.crc import key_slot

from queue_ratelimit import CostExceedsBurst, FairScheduler, Limit, Limiter, LimitNotFound

pytestmark = pytest.mark.cluster

HOUR = 3600.0


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


# -- a namespace over shards (Limiter(..., shards=N)) ------------------------------------------
def test_shards_spread_a_namespace_over_every_primary(
    cluster: list[RedisProcess], cluster_client: RedisCluster
) -> None:
    namespace = f"c{uuid.uuid4().hex[:10]}"
    lim = Limiter(cluster_client, namespace=namespace, shards=3)
    try:
        ports = {int(cluster_client.get_node_from_key(k.config).port) for k in lim.shard_keys}
        assert ports == {n.port for n in cluster}
        lim.set_limit("tenant:*", Limit(1, per=HOUR, burst=1))
        lim.set_limit("global", Limit(300, per=HOUR, burst=300))
        tenants = [f"t{i}" for i in range(30)]
        assert all(lim.acquire(t).allowed for t in tenants)
        assert not any(lim.acquire(t).allowed for t in tenants)
        for tenant in tenants:
            shard = lim.shard_keys[lim.shard_of(tenant)]
            assert cluster_client.exists(shard.tenant(tenant))
        assert lim._scripts.transport == "fcall"
    finally:
        cleanup_sharded(cluster_client, namespace)


Admission = tuple[float, float]  # (sent, answered), time.time() around an admitted acquire


def saturate(
    port: int, namespace: str, tenants: list[str], seconds: float, threads: int = 4
) -> list[Admission]:
    """Every thread asks for ``tenants`` in turn, without pause, for ``seconds``: the
    admissions, each between the times its call was sent and answered."""
    admitted: list[Admission] = []
    lock = threading.Lock()
    stop = time.time() + seconds

    def work(offset: int) -> None:
        client = RedisCluster(host="127.0.0.1", port=port, socket_timeout=5)
        lim = Limiter(client, namespace=namespace, shards=3, rebalance_interval=0.25)
        mine = []
        i = offset
        try:
            while (sent := time.time()) < stop:
                i += 1
                if lim.acquire(tenants[i % len(tenants)]).allowed:
                    mine.append((sent, time.time()))
        finally:
            client.close()
        with lock:
            admitted.extend(mine)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sorted(admitted)


def most_in_any_window(admitted: list[Admission], window: float) -> int:
    """The most admissions surely inside one window of ``window`` seconds: sent at or after
    its start and answered by its end (the server decided each between the two)."""
    best = 0
    for i, (start, _) in enumerate(admitted):
        end = start + window
        best = max(best, sum(1 for s, r in admitted[i:] if s >= start and r <= end))
    return best


@pytest.mark.parametrize("demand", ["uniform", "skewed"])
def test_a_sharded_global_cap_holds_its_bound_and_delivers_its_rate(
    cluster: list[RedisProcess], cluster_client: RedisCluster, demand: str
) -> None:
    """At most R*T + B + N*min(B, 1) in any interval T; under saturating demand, after the
    slices have moved to it (uniform: every shard; skewed: one shard's tenants only), at
    least 95% of R*T (docs/design.md, "Shards")."""
    namespace = f"c{uuid.uuid4().hex[:10]}"
    rate, burst, n = 200.0, 20.0, 3
    lim = Limiter(cluster_client, namespace=namespace, shards=n)
    try:
        lim.set_limit("global", Limit(rate, per=1, burst=burst))
        tenants = [f"t{i}" for i in range(60)]
        if demand == "skewed":
            tenants = [t for t in tenants if lim.shard_of(t) == 0]
        started = time.time()
        admitted = saturate(cluster[0].port, namespace, tenants, seconds=4.0)
        for window in (0.25, 1.0, 2.0, 4.0):
            assert most_in_any_window(admitted, window) <= rate * window + burst + n * 1
        # From 1.5 s on (the slices have moved): what was surely admitted in the window.
        low, high = started + 1.5, started + 3.9
        delivered = sum(1 for s, r in admitted if s >= low and r <= high)
        assert delivered >= 0.95 * rate * (high - low), delivered
        shares = lim.shares()["global"]
        if demand == "skewed":
            assert shares[0] > 0.95
    finally:
        cleanup_sharded(cluster_client, namespace)


def test_a_sharded_fair_scheduler_runs_every_item_once_on_a_cluster(
    cluster: list[RedisProcess], cluster_client: RedisCluster
) -> None:
    """Lanes per shard, each in its shard's slot; three threads dispatch and ack."""
    namespace = f"c{uuid.uuid4().hex[:10]}"
    lim = Limiter(cluster_client, namespace=namespace, shards=3)
    try:
        lim.set_limit("global", Limit(1000, per=1, burst=1000))
        lim.set_concurrency("tenant:*", 2)
        scheduler = FairScheduler(lim, lease=30)
        tenants = [f"t{i}" for i in range(12)]
        items = {f"{t}-{i}" for t in tenants for i in range(10)}
        for item in sorted(items):
            scheduler.submit(item.split("-")[0], item, queue="q")
        ran: list[str] = []
        lock = threading.Lock()

        def work() -> None:
            client = RedisCluster(host="127.0.0.1", port=cluster[0].port, socket_timeout=5)
            mine = FairScheduler(Limiter(client, namespace=namespace, shards=3), lease=30)
            idle_since = time.monotonic()
            while time.monotonic() - idle_since < 1.0:
                batch = mine.dispatch(["q"], max_items=5)
                if batch.items:
                    idle_since = time.monotonic()
                for item in batch.items:
                    with lock:
                        ran.append(item.id)
                    assert mine.ack(item)
            client.close()

        pool = [threading.Thread(target=work) for _ in range(3)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        assert sorted(ran) == sorted(items)
        assert scheduler.backlog("q") == 0
        assert scheduler.in_flight() == 0
    finally:
        cleanup_sharded(cluster_client, namespace)


def test_the_cli_admin_api_and_metrics_work_on_a_cluster_url(
    cluster: list[RedisProcess], cluster_client: RedisCluster, cluster_url: str
) -> None:
    """``redis+cluster://`` (any node) with ``--shards 3``: the CLI's changes reach every
    shard's primary; the admin API and the metrics snapshot read them back."""
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from queue_ratelimit.admin import create_app
    from queue_ratelimit.cli import main
    from queue_ratelimit.metrics import snapshot

    namespace = f"c{uuid.uuid4().hex[:10]}"
    runner = CliRunner(env={"REDIS_URL": None, "QUEUE_RATELIMIT_URL": None})
    base = ["--url", cluster_url, "--namespace", namespace, "--shards", "3"]
    try:
        for args in (["limits", "set", "global", "300/h"], ["limits", "set", "tenant:*", "2/h"]):
            result = runner.invoke(main, [*base, *args])
            assert result.exit_code == 0, result.output
        listed = runner.invoke(main, [*base, "limits", "list"])
        assert listed.exit_code == 0, listed.output
        assert "global" in listed.output
        assert "tenant:*" in listed.output
        lim = Limiter.from_url(cluster_url, namespace=namespace, shards=3)
        tenants = [next(t for t in (f"t{i}" for i in range(99)) if lim.shard_of(t) == s)
                   for s in range(3)]  # fmt: skip
        for tenant in tenants:
            assert [lim.acquire(tenant).allowed for _ in range(3)] == [True, True, False]
        snap = snapshot(lim)
        assert (snap["shards"], snap["totals"]["allowed"], snap["totals"]["denied"]) == (3, 6, 3)
        assert snap["denied_by"] == {"tenant:*": 3}
        with TestClient(create_app(lim, token="s3cret")) as api:
            auth = {"Authorization": "Bearer s3cret"}
            limits = api.get("/limits", headers=auth)
            assert limits.status_code == 200, limits.text
            assert {row["scope"] for row in limits.json()} >= {"global", "tenant:*"}
            metrics = api.get("/metrics", headers=auth)
            assert metrics.status_code == 200, metrics.text
        lim.close()
    finally:
        cleanup_sharded(cluster_client, namespace)
