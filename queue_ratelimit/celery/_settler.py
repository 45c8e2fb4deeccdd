"""Settling re-admitted jobs without waiting for Redis's answer each time.

Celery acknowledges a job from its event loop, once per job; closing the job's in-flight
record is one scheduler call. Waiting for each reply would stall the loop a round trip per
job, so the call is written on the gate's ``Wire`` at once (the same moment a waited-for
call would have been sent: a worker killed right after still has it on the wire) and the
reply is handled when it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from .._scheduler import DispatchedItem, FairScheduler, is_closed
from ._cluster_wire import AnyWire
from ._wire import Reply

# How a re-admitted job's in-flight record is closed: ran (remembered as done), back to
# the head of its backlog, or dropped (an invalid message).
Settlement = Literal["ack", "requeue", "drop"]
# Settlements left unanswered before the settler waits for them (without an event loop to
# read them as they come): bounds what a lost connection can leave in doubt.
MAX_PENDING = 64
# Told of each outcome: (item id, the item as held, settlement, closed). ``closed`` is None
# when the outcome is unknown (the connection failed, or the server refused the call): the
# caller settles it again the ordinary way.
OnSettled = Callable[[str, "DispatchedItem | str", Settlement, "bool | None"], None]


def usable(scheduler: FairScheduler) -> bool:
    """Whether the scheduler's calls can go over a ``Wire``: a plain ``redis.Redis`` client,
    or a ``RedisCluster`` (a ``ClusterWire``: a connection per primary), on servers with
    Functions (the raw ``FCALL``). A sharded namespace's calls too: on one server every
    shard's slot is on the one connection, on a cluster each on its primary's (a dispatch
    is one call per shard, sent turn by turn: ``FairScheduler.dispatch_turn``)."""
    scripts = scheduler._scripts
    if scripts.transport != "fcall":
        return False
    client = scheduler.client
    return isinstance(client, RedisCluster) or (
        bool(scripts._direct) and isinstance(client, redis.Redis)
    )


class AsyncSettler:
    """Sends settlements now; ``on_settled`` hears of each outcome when its reply comes."""

    def __init__(self, scheduler: FairScheduler, wire: AnyWire, on_settled: OnSettled) -> None:
        self.scheduler = scheduler
        self.wire = wire
        self._on_settled = on_settled
        self.pending = 0

    @property
    def usable(self) -> bool:
        return usable(self.scheduler)

    def sendable(self, item: str | DispatchedItem) -> bool:
        """Whether ``send`` can settle ``item``: on a sharded namespace only an item as
        dispatched names its shard (a bare id is settled the ordinary way, which asks
        the shards in turn)."""
        return self.usable and (
            isinstance(item, DispatchedItem) or getattr(self.scheduler.limiter, "shards", 1) == 1
        )

    def send(
        self, item: str | DispatchedItem, how: Settlement, remember: float, keep_slot: bool
    ) -> None:
        """Send the settlement on the wire; its outcome goes to ``on_settled`` (in doubt
        if it could not be written)."""
        keys, args = self.scheduler.settle_call(item, how, remember, keep_slot=keep_slot)
        item_id = item.id if isinstance(item, DispatchedItem) else item

        def settled(result: list[Reply] | RedisError) -> None:
            self.pending -= 1
            reply = result if isinstance(result, RedisError) else result[0]
            closed = None if isinstance(reply, RedisError | ResponseError) else is_closed(reply)
            self._on_settled(item_id, item, how, closed)

        self.pending += 1
        self.wire.send([self.scheduler.command(keys, args)], settled)
        if self.pending >= MAX_PENDING and self.wire.hub is None:
            self.wire.drain()
