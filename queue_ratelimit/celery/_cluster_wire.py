"""The gate's wire on a Redis Cluster: one ``Wire`` per primary, each call sent to the primary
that holds its key's slot.

A sharded namespace on a cluster has its shards' slots on several primaries, and one
connection reaches one server. So each primary gets a ``Wire`` of its own (made when a call
first goes there), all watched by the same event loop and written on the same turn; a send
whose calls live on several primaries is split, and its callback gets the replies in the
order of the calls once every part is in.

Slots move (a resharding, a failover): a call answered ``MOVED`` updates the client's slot
map and is sent again to the new owner; one answered ``ASK`` (its slot is migrating) is sent
once to the node named, after ``ASKING``. Neither ran where it was refused, so a resend
never runs a call twice. After ``MAX_REDIRECTS`` hops the refusal itself is the reply (a
``ResponseError``: the gate then makes the call the ordinary way, through the cluster
client, which follows redirects itself).

A primary that cannot be reached, or stops answering, fails the calls sent to it only: each
wire connects, fails, and is dropped when hung on its own, and each primary's pool has a
breaker of its own (``queue_ratelimit._client.cluster_client``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, MovedError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from ._wire import WIRE_STALL, NotSent, OnReply, Reply, Wire

log = logging.getLogger("queue_ratelimit.celery")

# Redirections one call may follow before its refusal is its reply (a slot that keeps
# moving, or a map that disagrees with itself, is left to the cluster client).
MAX_REDIRECTS = 5
# Commands whose keys follow a key count (the third word); any other has its key second.
_COUNTED_KEYS = frozenset({"FCALL", "FCALL_RO", "EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO"})


def _first_key(command: Sequence[Any]) -> Any:
    """The key a command is routed by (None: it has none)."""
    name = str(command[0]).upper()
    if name in _COUNTED_KEYS:
        return command[3] if len(command) > 3 and int(command[2]) > 0 else None
    return command[1] if len(command) > 1 else None


class _Gather:
    """The replies of one send, put together from its parts (and their redirections)."""

    __slots__ = ("answered", "errors", "on_reply", "remaining", "replies")

    def __init__(self, count: int, on_reply: OnReply) -> None:
        self.replies: list[Reply] = [None] * count
        self.remaining = count
        self.on_reply = on_reply
        self.errors: list[RedisError] = []
        self.answered = False  # some call of it reached Redis and was answered

    def put(self, index: int, reply: Reply) -> bool:
        self.replies[index] = reply
        self.answered = True
        return self._count(1)

    def fail(self, count: int, error: RedisError) -> bool:
        self.errors.append(error)
        return self._count(count)

    def _count(self, done: int) -> bool:
        self.remaining -= done
        return self.remaining == 0

    def result(self) -> list[Reply] | RedisError:
        """The replies, or the error that lost some of them: ``NotSent`` only when no call
        of the send reached Redis (nothing of it ran), else in doubt."""
        if not self.errors:
            return self.replies
        first = self.errors[0]
        if not self.answered and (
            len(self.errors) == 1 or all(isinstance(e, NotSent) for e in self.errors)
        ):
            return first
        return RedisConnectionError(f"queue-ratelimit: part of the calls were lost: {first}")


class ClusterWire:
    """``Wire``'s interface over a Redis Cluster: a ``Wire`` per primary, calls routed by
    their key's slot. Callbacks run on the thread that reads, as ``Wire``'s do."""

    def __init__(
        self, client: RedisCluster, hub: Any = None, min_stall: float = WIRE_STALL
    ) -> None:
        self.client = client
        self.min_stall = min_stall
        self.hub: Any = None
        self.wires: dict[str, Wire] = {}
        self.redirects = 0  # calls sent again after MOVED or ASK (for stats and tests)
        self.attach(hub)

    # -- the event loop ------------------------------------------------------------------
    def attach(self, hub: Any) -> None:
        self.hub = hub
        for wire in self.wires.values():
            wire.attach(hub)

    def detach(self) -> None:
        for wire in self.wires.values():
            wire.detach()
        self.hub = None

    # -- what Wire offers ----------------------------------------------------------------
    @property
    def writes(self) -> int:
        return sum(wire.writes for wire in self.wires.values())

    @property
    def pending(self) -> int:
        return sum(wire.pending for wire in self.wires.values())

    def groups(self, keys: Sequence[Sequence[str]]) -> list[list[int]]:
        """The calls whose first keys are ``keys``, by slot (positions, in order): sent
        apart, each group's outcome is its own (a primary down fails its groups only)."""
        by_slot: dict[int, list[int]] = {}
        for index, call_keys in enumerate(keys):
            by_slot.setdefault(self.client.keyslot(call_keys[0]), []).append(index)
        return list(by_slot.values())

    @property
    def stall_limit(self) -> float:
        kwargs = self.client.nodes_manager.connection_kwargs
        return max(self.min_stall, float(kwargs.get("socket_timeout") or 0.0))

    def send(self, commands: Sequence[Sequence[Any]], on_reply: OnReply) -> None:
        """``Wire.send``: each call goes to its slot's primary (a send over several is
        split); ``on_reply`` gets every reply in order, or the error that lost some."""
        if not commands:
            on_reply([])
            return
        gather = _Gather(len(commands), on_reply)
        by_node: dict[int, tuple[Wire, list[int]]] = {}
        for index, command in enumerate(commands):
            try:
                wire = self._wire_for(command)
            except (RedisError, RedisClusterException) as exc:
                self._failed(gather, 1, NotSent(f"queue-ratelimit: no node for the call: {exc}"))
                continue
            by_node.setdefault(id(wire), (wire, []))[1].append(index)
        for wire, indexes in by_node.values():
            self._send_part(wire, [commands[i] for i in indexes], indexes, commands, gather, 0)

    def flush(self) -> None:
        for wire in list(self.wires.values()):
            wire.flush()

    def poll(self) -> None:
        for wire in list(self.wires.values()):
            wire.poll()

    def stalled_for(self) -> float:
        return max((wire.stalled_for() for wire in list(self.wires.values())), default=0.0)

    def drop_if_hung(self) -> float:
        """``Wire.drop_if_hung`` for each primary's connection on its own (a hung primary's
        calls are in doubt; the others' are kept): the longest wait of those dropped."""
        return max((wire.drop_if_hung() for wire in list(self.wires.values())), default=0.0)

    def drain(self) -> None:
        """Wait for every reply due, redirections included."""
        while self.pending:
            for wire in list(self.wires.values()):
                wire.drain()

    def close(self) -> None:
        for wire in list(self.wires.values()):
            wire.close()

    # -- internals -------------------------------------------------------------------------
    def _wire_for(self, command: Sequence[Any]) -> Wire:
        key = _first_key(command)
        if key is None:
            node = self.client.get_default_node()
        else:
            slot = self.client.keyslot(key)
            node = self.client.nodes_manager.get_node_from_slot(slot)
        return self._wire_of(node)

    def _wire_of(self, node: ClusterNode) -> Wire:
        wire = self.wires.get(node.name)
        if wire is None:
            wire = Wire(self.client.get_redis_connection(node), self.hub, self.min_stall)
            self.wires[node.name] = wire
        return wire

    def _send_part(
        self,
        wire: Wire,
        part: list[Sequence[Any]],
        indexes: list[int],
        commands: Sequence[Sequence[Any]],
        gather: _Gather,
        hops: int,
        asking: bool = False,
    ) -> None:
        sent = [("ASKING",), *part] if asking else part

        def landed(result: list[Reply] | RedisError) -> None:
            if isinstance(result, RedisError):
                self._failed(gather, len(indexes), result)
                return
            for index, reply in zip(indexes, result[1:] if asking else result, strict=True):
                if isinstance(reply, AskError) and hops < MAX_REDIRECTS:
                    self._redirect(reply, index, commands, gather, hops + 1)
                elif gather.put(index, reply):
                    self._done(gather)

        wire.send(sent, landed)

    def _redirect(
        self,
        refusal: AskError,
        index: int,
        commands: Sequence[Sequence[Any]],
        gather: _Gather,
        hops: int,
    ) -> None:
        """Send call ``index`` again where ``refusal`` (MOVED or ASK) points: it did not
        run where it was refused."""
        self.redirects += 1
        manager = self.client.nodes_manager
        try:
            if isinstance(refusal, MovedError):
                manager.move_slot(refusal)  # the slot's owner from now on
                node = manager.get_node_from_slot(refusal.slot_id)
            else:  # ASK: this once (the slot is migrating; its owner is still the other)
                node = manager.get_node(refusal.host, refusal.port) or ClusterNode(
                    refusal.host, refusal.port
                )
            wire = self._wire_of(node)
        except (RedisError, RedisClusterException) as exc:
            self._failed(gather, 1, NotSent(f"queue-ratelimit: cannot follow {refusal}: {exc}"))
            return
        asking = not isinstance(refusal, MovedError)
        self._send_part(wire, [commands[index]], [index], commands, gather, hops, asking)

    def _failed(self, gather: _Gather, count: int, error: RedisError) -> None:
        if gather.fail(count, error):
            self._done(gather)

    def _done(self, gather: _Gather) -> None:
        try:
            gather.on_reply(gather.result())
        except Exception:
            log.exception("queue-ratelimit: error handling a Redis reply")


def make_wire(client: Any, hub: Any = None) -> Wire | ClusterWire:
    """The gate's wire for ``client``: one per primary for a cluster client."""
    if isinstance(client, RedisCluster):
        return ClusterWire(client, hub)
    return Wire(client, hub)


# What the gate, the settler and the credit ledger send on.
AnyWire = Wire | ClusterWire
