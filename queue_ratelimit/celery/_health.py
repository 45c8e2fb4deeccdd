"""The gate's view of its Redis: answering, out (an outage) or broken (answering errors)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from .._core import is_outage
from .._decision import Slot
from .._errors import BackendError, BackendUnavailable, RateLimitError

log = logging.getLogger("queue_ratelimit.celery")

# What a call of the gate to Redis may raise: the scheduler's errors (and, from the calls
# the gate makes on a connection itself, redis-py's).
REDIS_FAILURES = (BackendUnavailable, BackendError, RedisError, RedisClusterException)
# After a failure, Redis is left alone this many times as long as the failed call took
# (within the bounds below) before the next call: a Redis that stops answering then costs
# the consumer's event loop one timeout per probe, not one per message.
REST_FACTOR = 4.0
MIN_REST = 0.25
MAX_REST = 10.0
# A broken Redis is logged again this often while it stays broken.
RELOG_EVERY = 60.0


class RedisHealth:
    """Tells an outage (the fail mode decides) from broken data in Redis (a script error, a
    key of the wrong type: work is held, whatever the fail mode, and logged loudly), and
    says when to ask Redis again.

    Args:
        fail_mode: the gate's fail mode, for the log.
        clock: seconds, monotonic (tests pass their own).
        on_back: called when a call succeeds after failures (Redis is back).
        max_rest: the longest rest (seconds; at most MAX_REST): a gate holding leases
            must be back within a sixth of one after an outage (lua/buckets.lua,
            "Silences").
    """

    def __init__(
        self,
        fail_mode: str,
        clock: Callable[[], float] = time.monotonic,
        on_back: Callable[[], None] | None = None,
        max_rest: float = MAX_REST,
    ) -> None:
        self.fail_mode = fail_mode
        self._clock = clock
        self._on_back = on_back
        self.max_rest = min(max(max_rest, MIN_REST), MAX_REST)
        self.down_since: float | None = None
        self.broken = False  # the last failure was an error Redis answered with
        self._probe_at = 0.0
        # The last error logged and when, so that a part of Redis that stays broken while
        # the rest answers (the gate passes, a dispatch fails) is not logged every probe.
        self._logged: tuple[str, float] = ("", float("-inf"))
        self._said_down = False  # this failure was logged: say when it is over

    def resting(self) -> bool:
        """True while a recent failure says not to call Redis yet."""
        return self.down_since is not None and self._clock() < self._probe_at

    def failed(self, exc: BaseException, started: float) -> None:
        """A call that began at ``started`` (on the clock) failed with ``exc``."""
        now = self._clock()
        self._probe_at = now + min(max(REST_FACTOR * (now - started), MIN_REST), self.max_rest)
        broken = not (isinstance(exc, BackendUnavailable) or is_outage(exc))
        changed = self.down_since is None or broken != self.broken
        self.broken = broken
        if self.down_since is None:
            self.down_since = now
            self._said_down = False
        if broken:
            text, at = self._logged
            if str(exc) != text or now - at >= RELOG_EVERY:
                self._logged = (str(exc), now)
                self._said_down = True
                log.error(
                    "queue-ratelimit: Redis answered with an error (%s): the gate holds "
                    "every task (none runs, whatever the fail mode, and none is lost) until "
                    "it is fixed; this is broken data or configuration in Redis, not an "
                    "outage",
                    exc,
                )
        elif changed:
            self._said_down = True
            log.error(
                "queue-ratelimit: Redis unreachable (%s): gate fails %s until it returns",
                exc,
                self.fail_mode.upper(),
            )

    def ok(self) -> None:
        """A call succeeded."""
        if self.down_since is not None:
            if self._said_down:
                log.warning(
                    "queue-ratelimit: Redis %s again after %.1fs; gate enforcing",
                    "answering without errors" if self.broken else "reachable",
                    self._clock() - self.down_since,
                )
            self.down_since = None
            self.broken = False
            if self._on_back is not None:
                try:
                    self._on_back()
                except Exception:  # (on the event loop: nothing may escape)
                    log.exception("queue-ratelimit: error after Redis came back")


class GateHealth:
    """The gate's ``RedisHealth``, one per primary when its calls go to a Redis Cluster.

    On one server (``shards`` or not) every call shares one health, as ever: a failure rests
    them all. On a cluster each primary has its own, found from the slot a call's first key
    lives in (a tenant's shard, a dispatch turn's keys, the namespace's home): a primary that
    fails rests only the calls routed to it, and the fail mode decides only for the tenants
    whose shards live there. The slot map is read at each look, so a slot that moved (a
    failover) is judged by its new owner's health.

    Args:
        make: a new ``RedisHealth`` (the gate's settings; ``on_back`` hears of each one).
        limiter: the gate's limiter (its client says whether it is a cluster's).
    """

    def __init__(self, make: Callable[[], RedisHealth], limiter: Any = None) -> None:
        self._make = make
        # One server's health; on a cluster, that of a call no primary is known for.
        self.one = make()
        client = getattr(limiter, "client", None)
        self._cluster: RedisCluster | None = client if isinstance(client, RedisCluster) else None
        self._limiter = limiter
        self._by_node: dict[str, RedisHealth] = {}
        self._shard_slots: dict[int, int] = {}

    def __iter__(self) -> Iterator[RedisHealth]:
        return iter([self.one, *self._by_node.values()])

    def of_tenant(self, tenant: str) -> RedisHealth:
        """The health of the primary that holds ``tenant``'s shard."""
        if self._cluster is None:
            return self.one
        limiter = self._limiter
        return self._of_shard(limiter.shard_of(tenant) if getattr(limiter, "shards", 1) > 1 else -1)

    def _of_shard(self, shard: int) -> RedisHealth:
        """Shard ``shard``'s primary's (-1: an unsharded namespace's, all in one slot)."""
        assert self._cluster is not None
        slot = self._shard_slots.get(shard)
        if slot is None:
            keys = self._limiter.shard_keys[shard] if shard >= 0 else self._limiter.keys
            slot = self._shard_slots[shard] = self._cluster.keyslot(keys.config)
        return self._of_slot(slot)

    def of_slot(self, slot: Slot) -> RedisHealth:
        """The health of the primary that holds a concurrency ``slot`` (its shard's)."""
        if self._cluster is None:
            return self.one
        limiter = self._limiter
        try:
            shard = limiter.shard_slot(slot)[0] if getattr(limiter, "shards", 1) > 1 else -1
        except RateLimitError:  # not one of this namespace's: the shared one
            return self.one
        return self._of_shard(shard)

    def of_key(self, key: str) -> RedisHealth:
        """The health of the primary that holds ``key``."""
        if self._cluster is None:
            return self.one
        return self._of_slot(self._cluster.keyslot(key))

    @property
    def home(self) -> RedisHealth:
        """The health of the namespace's home slot (its configuration)."""
        if self._cluster is None:
            return self.one
        return self.of_key(self._limiter.keys.config)

    def _of_slot(self, slot: int) -> RedisHealth:
        assert self._cluster is not None
        try:
            name = self._cluster.nodes_manager.get_node_from_slot(slot).name
        except (RedisError, RedisClusterException):  # no owner known: the shared one
            return self.one
        health = self._by_node.get(name)
        if health is None:
            health = self._by_node[name] = self._make()
        return health

    def answers_besides(self, health: RedisHealth) -> bool:
        """Whether a primary other than ``health``'s (of those seen so far) answers: a
        partial outage of a cluster (never on one server, where there is no other)."""
        return any(h is not health and h.down_since is None for h in self._by_node.values())

    # -- the worker as a whole (``celery inspect qrl_gate``) --------------------------------
    def everywhere(self, out: Callable[[RedisHealth], bool]) -> bool:
        """Whether ``out`` holds for every primary seen so far (one server: the one)."""
        return all(out(h) for h in (list(self._by_node.values()) or [self.one]))

    @property
    def down_since(self) -> float | None:
        """Since when some primary has been failing (None: every one answers)."""
        return min((h.down_since for h in self if h.down_since is not None), default=None)

    @property
    def broken(self) -> bool:
        """Whether some primary answers with errors."""
        return any(h.broken for h in self)
