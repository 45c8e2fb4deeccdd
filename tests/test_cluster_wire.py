"""The Celery gate's wire on a real Redis Cluster (``ClusterWire``): a connection per primary,
calls routed by slot, MOVED and ASK followed, a primary down failing its own calls only."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import NO_RETRY, RedisProcess, cleanup_sharded
from redis.cluster import RedisCluster
from redis.exceptions import RedisError

from queue_ratelimit import FairScheduler, Limiter
from queue_ratelimit._client import redis_client
from queue_ratelimit._scheduler import SubmitItem
from queue_ratelimit.celery._cluster_wire import ClusterWire, make_wire
from queue_ratelimit.celery._settler import usable
from queue_ratelimit.celery._wire import NotSent, Wire

pytestmark = pytest.mark.cluster

Result = list[Any] | RedisError


def sent(wire: ClusterWire, commands: list[tuple[Any, ...]]) -> Result:
    """Send ``commands`` in one send and wait for the outcome."""
    got: list[Result] = []
    wire.send(commands, got.append)
    wire.drain()
    (result,) = got
    return result


@pytest.fixture
def sharded(cluster_url: str) -> Iterator[Any]:
    namespace = f"w{uuid.uuid4().hex[:10]}"
    lim = Limiter.from_url(cluster_url, namespace=namespace, shards=3)
    yield lim
    cleanup_sharded(lim.client, namespace)
    lim.close()


def node_id(port: int) -> str:
    direct = redis.Redis(port=port, retry=NO_RETRY)
    try:
        return str(direct.execute_command("CLUSTER MYID").decode())
    finally:
        direct.close()


def on_node(port: int, *command: Any) -> None:
    direct = redis.Redis(port=port, retry=NO_RETRY)
    try:
        direct.execute_command(*command)
    finally:
        direct.close()


def on_every_node(cluster: list[RedisProcess], first: int, *command: Any) -> None:
    """Run a CLUSTER SETSLOT on the node at port ``first``, then on the others."""
    for port in sorted((n.port for n in cluster), key=lambda p: p != first):
        on_node(port, *command)


def free_key(client: RedisCluster, owner_port: int | None = None) -> tuple[str, int, int]:
    """A key of an empty slot (on the node at ``owner_port`` if given): (key, slot, port)."""
    while True:
        key = f"wire-{uuid.uuid4().hex[:10]}"
        slot = client.keyslot(key)
        port = int(client.nodes_manager.get_node_from_slot(slot).port)
        empty = client.cluster_countkeysinslot(slot) == 0
        if empty and owner_port in (None, port):
            return key, slot, port


def test_the_gate_takes_a_cluster_wire_for_a_cluster_client(sharded: Any) -> None:
    scheduler = FairScheduler(sharded)
    scheduler.backlog("q")  # (the first call settles the transport: Functions)
    sharded.acquire("someone")
    assert usable(scheduler), "a cluster client's calls may go on the wire"
    assert isinstance(make_wire(sharded.client), ClusterWire)
    assert isinstance(make_wire(redis.Redis()), Wire)


def test_a_send_over_every_shard_goes_to_each_primary_and_is_answered_in_order(
    sharded: Any, cluster: list[RedisProcess]
) -> None:
    scheduler = FairScheduler(sharded)
    sharded.acquire("someone")
    items = [SubmitItem(f"t{i}", f"item{i}", queue="q") for i in range(12)]
    calls = scheduler.submit_calls(items)
    wire = ClusterWire(sharded.client)
    assert sent(wire, [scheduler.command(k, a) for k, a in calls]) == [1] * 12
    assert {int(name.rsplit(":", 1)[1]) for name in wire.wires} == {n.port for n in cluster}
    for item in items:
        assert scheduler.backlog("q", tenant=item.tenant) == 1
    # Grouped by slot: one group per shard, each in the order given.
    groups = wire.groups([keys for keys, _ in calls])
    assert sorted(i for g in groups for i in g) == list(range(12))
    for group in groups:
        assert group == sorted(group)
        assert len({sharded.shard_of(items[i].tenant) for i in group}) == 1
    assert len(groups) == 3
    # Replies in order across primaries: the duplicates come back as such, mixed.
    again = [scheduler.command(*calls[i]) for i in (5, 0, 11)]
    assert sent(wire, again) == [0, 0, 0]
    wire.close()


class Slot:
    """A key of an empty slot, the wire and client that will send to it, the slot's owner
    and another primary to move it to."""

    def __init__(self, cluster: list[RedisProcess], cluster_url: str) -> None:
        client = redis_client(cluster_url)
        assert isinstance(client, RedisCluster)
        self.client = client
        self.wire = ClusterWire(client)
        self.key, self.slot, self.owner = free_key(client)
        self.target = next(n.port for n in cluster if n.port != self.owner)
        self.owner_id, self.target_id = node_id(self.owner), node_id(self.target)

    def node(self) -> int:
        """The slot's owner as the client's map says."""
        return int(self.client.nodes_manager.get_node_from_slot(self.slot).port)


@pytest.fixture
def slot(cluster: list[RedisProcess], cluster_url: str) -> Iterator[Slot]:
    """``Slot``; afterwards its key is deleted and the slot given back to its owner."""
    s = Slot(cluster, cluster_url)
    yield s
    on_every_node(cluster, s.target, "CLUSTER", "SETSLOT", s.slot, "NODE", s.target_id)
    s.client.delete(s.key)
    on_every_node(cluster, s.owner, "CLUSTER", "SETSLOT", s.slot, "NODE", s.owner_id)
    s.wire.close()
    s.client.close()


def test_a_moved_slot_is_followed_and_the_map_updated(
    cluster: list[RedisProcess], slot: Slot
) -> None:
    on_every_node(cluster, slot.target, "CLUSTER", "SETSLOT", slot.slot, "NODE", slot.target_id)
    assert sent(slot.wire, [("SET", slot.key, "v"), ("GET", slot.key)]) == [b"OK", b"v"]
    assert slot.wire.redirects == 2  # (both were sent before the first MOVED came back)
    assert slot.node() == slot.target
    assert sent(slot.wire, [("GET", slot.key)]) == [b"v"]
    assert slot.wire.redirects == 2, "the map is right now"


def test_a_migrating_slot_is_asked_once_without_moving_the_map(
    cluster: list[RedisProcess], slot: Slot
) -> None:
    on_node(slot.target, "CLUSTER", "SETSLOT", slot.slot, "IMPORTING", slot.owner_id)
    on_node(slot.owner, "CLUSTER", "SETSLOT", slot.slot, "MIGRATING", slot.target_id)
    # The key is not on the source: it answers ASK, and the target takes it after ASKING.
    assert sent(slot.wire, [("SET", slot.key, "v")]) == [b"OK"]
    assert slot.wire.redirects == 1
    assert slot.node() == slot.owner
    on_every_node(cluster, slot.target, "CLUSTER", "SETSLOT", slot.slot, "NODE", slot.target_id)
    assert sent(slot.wire, [("GET", slot.key)]) == [b"v"], "the key went where it was asked"


def test_a_primary_down_fails_the_calls_to_it_only(partial_cluster: list[RedisProcess]) -> None:
    url = f"redis+cluster://127.0.0.1:{partial_cluster[0].port}/0"
    namespace = f"w{uuid.uuid4().hex[:10]}"
    lim = Limiter.from_url(url, namespace=namespace, shards=3)
    scheduler = FairScheduler(lim)
    lim.acquire("someone")
    tenants = {lim.shard_of(t): t for t in (f"t{i}" for i in range(30))}
    items = [SubmitItem(tenants[shard], f"item{shard}", queue="q") for shard in range(3)]
    calls = scheduler.submit_calls(items)
    wire = ClusterWire(lim.client)
    assert sent(wire, [scheduler.command(*calls[0])]) == [1]  # connected to one of them
    dead = int(lim.client.get_node_from_key(calls[2][0][0]).port)
    next(n for n in partial_cluster if n.port == dead).stop()

    outcomes = [sent(wire, [scheduler.command(*call)]) for call in calls]
    assert outcomes[0] == [0], "a duplicate by now: its primary answers"
    assert isinstance(outcomes[2], NotSent), "refused at once: nothing of it ran"
    alive = [o for o, call in zip(outcomes, calls, strict=True)
             if int(lim.client.get_node_from_key(call[0][0]).port) != dead]  # fmt: skip
    assert all(isinstance(o, list) for o in alive)
    # One send over the live primaries and the dead one: the live parts ran, so the
    # whole is in doubt, not "not sent".
    mixed = sent(wire, [scheduler.command(*call) for call in calls])
    assert isinstance(mixed, RedisError)
    assert not isinstance(mixed, NotSent)
    wire.close()
    lim.client.close()
