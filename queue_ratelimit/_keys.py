"""The Redis key layout: the one place that names every key of a namespace.

Every key of a namespace is ``<prefix>:{<namespace>}:<tag>`` or
``<prefix>:{<namespace>}:<tag>:<part>:...``: a fixed tag first, then the user-chosen parts
(tenant, queue, priority, item id, scope). No tag contains ':' and no two are equal; every
user part but the last of a key cannot contain ':' (``check_name``, ``check_priority``), and
the last may (item ids, scopes) only because nothing follows it. So reading a key from the
left recovers its kind and its parts (``KeySpace.parse``): no name a user can choose gives
two keys the same name. The braces are a Redis Cluster hash tag, so the multi-key scripts
stay legal on a cluster.

The Lua scripts never spell a key themselves: they get the names (KEYS) or, where the user
part is only known inside the script (a tenant read from a sorted set, a lane from an item's
record), the prefix of the kind (``scheduler_prefixes``), and append the parts joined by
':' exactly as the methods here do. The one exception is the limiter's decision script
(``acquire.lua``, the hot path), which takes the tenant hash and the shared hash alone:
``buckets.lua`` reads the config key and the tenant from their names (``<base>:shared`` ->
``<base>:config``; ``<base>:t:<tenant>`` -> the tenant, refused unless under the same base),
and names the concurrency slot sets and the recording hashes from the config key
(``<base>:config`` -> ``<base>:c:<scope>``, ``<base>:rec:<minute>``), rather than take
more keys and arguments on every decision; the test suite checks that every key the
scripts write is one ``parse`` recognises.

The fair scheduler's keys carry the layout's version in their tag (``s2``). Version 1
(queue-ratelimit 0.1) named them ``<base>:s:<lane>:...``, where a queue called ``done`` or
``receipt`` collided with item ids; ``legacy_meta`` finds work a version-1 process left
(docs/design.md, "Upgrading").
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from ._errors import ConfigError
from ._scopes import Scope, check_item_id, check_name, check_namespace, check_priority

DEFAULT_PREFIX = "qrl"
DEFAULT_NAMESPACE = "default"
# The fair scheduler's key tag, with the layout version: s2 = layout 2 (see the docstring).
SCHEDULER_TAG = "s2"

# The most shards a namespace may be spread over (Limiter(shards=...)): far more than the
# primaries any cluster has, and few enough that a rebalance stays a small job.
MAX_SHARDS = 1024

# Kinds of key by tag, and how many user parts follow the tag. Tags under the scheduler's
# are spelled "s2:<tag>"; "legacy" is any key of scheduler layout 1 ("s:...").
_FIXED = {"config", "audit", "shared", "snapshot", "dt", "pauses", "share", "rebalance"}
_ONE_PART = {"t": "tenant", "c": "slots", "rec": "record"}
_SCHEDULER_FIXED = {"inflight", "lease", "meta", "payload", "lanes"}
_SCHEDULER_PARTS = {
    "active": ("active", 1),
    "parked": ("parked", 1),
    "n": ("counts", 1),
    "age": ("age", 1),
    "tp": ("classes", 2),
    "bl": ("backlog", 3),
    "done": ("done", 1),
    "receipt": ("receipt", 1),
    "wake": ("waiters", 1),
    "tr": ("transit", 2),
}
KINDS = frozenset(
    {*_FIXED, *_ONE_PART.values(), *_SCHEDULER_FIXED, *(k for k, _ in _SCHEDULER_PARTS.values())}
)


def check_shards(shards: object) -> int:
    """``shards`` if it is a whole number from 1 to MAX_SHARDS, else ``ConfigError``."""
    if type(shards) is not int or not 1 <= shards <= MAX_SHARDS:
        raise ConfigError(f"shards must be a whole number from 1 to {MAX_SHARDS}, got {shards!r}")
    return shards


def shard_of(tenant: str, shards: int) -> int:
    """The shard of a tenant: CRC-32 of its name, so every process agrees without asking."""
    if shards == 1:
        return 0
    return zlib.crc32(tenant.encode()) % shards


@functools.cache
def shard_tag(namespace: str, shard: int, shards: int) -> str:
    """The hash tag of one shard: ``<namespace>:<shard>``, or ``<namespace>:<shard>.<n>``
    for the first n whose hash slot falls in the shard's share of the slot space
    (``shard/shards`` to ``(shard+1)/shards`` of it).

    So the shards spread evenly over the slots, and over the primaries of a cluster whose
    slots are spread evenly (``redis-cli --cluster create`` gives each primary one range):
    plain ``<namespace>:<shard>`` tags land where CRC16 puts them, three of them on one
    primary of three in one case of nine. Every process computes the same tags.
    """
    low = shard * REDIS_CLUSTER_HASH_SLOTS // shards
    high = (shard + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
    tag, n = f"{namespace}:{shard}", 0
    while not low <= key_slot(tag.encode()) < high:
        n += 1
        tag = f"{namespace}:{shard}.{n}"
    return tag


class SchedulerPrefixes(NamedTuple):
    """The prefixes lua/scheduler.lua appends user parts to (joined by ':'), passed in this
    order: a lane's keys (+ lane), a tenant's classes (+ lane:tenant), a class backlog
    (+ lane:tenant:priority), a cap's waiters (+ scope), a tenant hash (+ tenant), a
    tenant's jobs in transit (+ lane:tenant)."""

    active: str
    parked: str
    counts: str
    age: str
    classes: str
    backlog: str
    waiters: str
    tenant: str
    transit: str


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Names the keys of one namespace: ``<prefix>:{<namespace>}:...``.

    Methods that take user parts validate them (``InvalidName``), so an invalid name never
    becomes a key.
    """

    prefix: str = DEFAULT_PREFIX
    namespace: str = DEFAULT_NAMESPACE
    # One shard of a namespace spread over ``shards`` hash slots (docs/design.md, "Shards"),
    # or None: the namespace's own keys (every key of an unsharded namespace, and the home
    # of a sharded one: its configuration as set, the audit, the lease state).
    shard: int | None = None
    shards: int = 1

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        check_namespace(self.prefix)
        check_shards(self.shards)
        if self.shard is not None and not (
            type(self.shard) is int and 0 <= self.shard < self.shards
        ):
            raise ConfigError(f"shard must be None or 0 to {self.shards - 1}, got {self.shard!r}")

    @property
    def base(self) -> str:
        if self.shard is None:
            return f"{self.prefix}:{{{self.namespace}}}"
        return f"{self.prefix}:{{{shard_tag(self.namespace, self.shard, self.shards)}}}"

    # -- shards ------------------------------------------------------------------------
    def for_shard(self, shard: int) -> KeySpace:
        """The key layout of one shard of this namespace (``shards`` > 1)."""
        return KeySpace(self.prefix, self.namespace, shard, self.shards)

    def shard_of(self, tenant: str) -> int:
        """The shard a tenant's buckets, slots and backlogs live on (0 when unsharded)."""
        return shard_of(tenant, self.shards)

    @property
    def share(self) -> str:
        """Hash of a sharded namespace's lease state (on its home slot): the rebalancer's
        lock, its fencing epoch, the counters it last saw per shard (_leases.py)."""
        return f"{self.base}:share"

    @property
    def rebalance(self) -> str:
        """String: the rebalancer's lock (on a sharded namespace's home slot), held for one
        rebalance interval by the process whose turn it is."""
        return f"{self.base}:rebalance"

    @property
    def pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every key of the namespace (no glob character can
        appear in a prefix or namespace)."""
        return f"{self.base}:*"

    # -- the limiter -------------------------------------------------------------------
    @property
    def config(self) -> str:
        """Hash of scope -> encoded limit, plus ``exempt:<t>``, ``mode:shadow``, ``_version``."""
        return f"{self.base}:config"

    @property
    def audit(self) -> str:
        """Stream of configuration changes."""
        return f"{self.base}:audit"

    @property
    def pauses(self) -> str:
        """Sorted set of paused scope -> Redis time (ms) its pause ends: the index that lets
        lua/config.lua forget pauses that ran out (the pauses themselves are config fields
        ``pause:<scope>``)."""
        return f"{self.base}:pauses"

    @property
    def shared(self) -> str:
        """Hash of the global and per-queue buckets and the aggregate counters."""
        return f"{self.base}:shared"

    @property
    def snapshot(self) -> str:
        """String: the JSON snapshot published for dashboards (metrics.publish_snapshot)."""
        return f"{self.base}:snapshot"

    @property
    def tenant_prefix(self) -> str:
        """What every tenant hash's name starts with (the tenant name follows)."""
        return f"{self.base}:t:"

    @property
    def tenant_denials(self) -> str:
        """Sorted set of tenant -> its denials (by any scope), the most denied kept: read by
        the metrics for their per-tenant series (lua/buckets.lua, ``count_tenant_denial``)."""
        return f"{self.base}:dt"

    def tenant(self, tenant: str) -> str:
        """Hash of one tenant's buckets and counters; it expires once the tenant is idle."""
        return f"{self.base}:t:{check_name('tenant', tenant)}"

    def slots(self, scope: str) -> str:
        """Sorted set of the holders of a capped scope's concurrency slots -> lease deadline
        (Redis time in microseconds); ``scope`` names one tenant, not a default. (Named by
        buckets.lua from the config key: ``<base>:c:<scope>``.)"""
        return f"{self.base}:c:{Scope.parse(scope)}"

    def record(self, minute: int) -> str:
        """Hash of one minute's recorded traffic (previews; named by buckets.lua too)."""
        return f"{self.base}:rec:{int(minute)}"

    def bucket_location(self, scope: Scope) -> tuple[str, str] | None:
        """The (key, field) holding a scope's bucket tokens (their Redis-clock time is in
        field ``<field>:u``); None for default scopes."""
        if scope.is_default:
            return None
        if scope.kind == "global":
            return self.shared, "b:global"
        if scope.kind == "queue":
            return self.shared, f"b:queue:{scope.queue}"
        if scope.kind == "priority":
            return self.shared, f"b:priority:{scope.priority}"
        assert scope.tenant is not None
        key = self.tenant(scope.tenant)
        return (key, "b") if scope.kind == "tenant" else (key, f"bq:{scope.queue}")

    @staticmethod
    def window_fields(
        field: str, periods: Sequence[float], places: Sequence[str | None] = ()
    ) -> list[str]:
        """The field of each window of a scope (lua/buckets.lua add_buckets), ``field``
        being the scope's own (``bucket_location``): the first shortest window keeps it,
        each other is ``<field>:w<period in seconds>`` (``...:2``, ``...:3`` for further
        windows of one period), unless ``places`` (``ScopeLimit._places``: where
        lua/config.lua kept a window's state when the windows changed) says otherwise. A
        credit bank is ``<field>:c``."""
        shortest = min(periods)
        seen: dict[float, int] = {}
        names = []
        for i, per in enumerate(periods):
            n = seen[per] = seen.get(per, 0) + 1
            place = places[i] if i < len(places) else None
            if place is None:
                place = "" if per == shortest and n == 1 else f"w{_lua_number(per)}"
                place += f":{n}" if n > 1 else ""
            names.append(f"{field}:{place}" if place else field)
        return names

    # -- the fair scheduler (lua/scheduler.lua) -----------------------------------------
    @property
    def scheduler(self) -> str:
        """What every scheduler key's name starts with (then ``:<tag>``)."""
        return f"{self.base}:{SCHEDULER_TAG}"

    @property
    def inflight(self) -> str:
        """Sorted set: dispatched item -> lease deadline (ms)."""
        return f"{self.scheduler}:inflight"

    @property
    def lease(self) -> str:
        """Hash: dispatched item -> its lease token (and the cap scopes it holds slots of)."""
        return f"{self.scheduler}:lease"

    @property
    def meta(self) -> str:
        """Hash: parked or dispatched item -> its record (lane, tenant, priority, ...)."""
        return f"{self.scheduler}:meta"

    @property
    def payload(self) -> str:
        """Hash: parked or dispatched item -> its opaque payload."""
        return f"{self.scheduler}:payload"

    @property
    def lanes(self) -> str:
        """Set of the lanes (queues) with work, so metrics find them without SCAN; a lane
        leaves it when it empties."""
        return f"{self.scheduler}:lanes"

    def active(self, lane: str) -> str:
        """Sorted set: a lane's backlogged tenants -> pass."""
        return f"{self.scheduler}:active:{check_name('queue', lane)}"

    def parked(self, lane: str) -> str:
        """Sorted set: a lane's tenants held back by their own caps -> wake time (ms)."""
        return f"{self.scheduler}:parked:{check_name('queue', lane)}"

    def counts(self, lane: str) -> str:
        """Hash: a lane's backlog size per tenant, ``:total``, ``:vt``, ``:gv``, ``:st``,
        ``:jb``, ``:ep``, ``:cv``; expires the counter retention after the lane empties."""
        return f"{self.scheduler}:n:{check_name('queue', lane)}"

    def age(self, lane: str) -> str:
        """Sorted set: a lane's waiting items -> the time they were first queued (ms)."""
        return f"{self.scheduler}:age:{check_name('queue', lane)}"

    def classes(self, lane: str, tenant: str) -> str:
        """Sorted set: a tenant's backlogged priorities in a lane -> pass."""
        return f"{self.scheduler}:tp:{check_name('queue', lane)}:{check_name('tenant', tenant)}"

    def backlog(self, lane: str, tenant: str, priority: str) -> str:
        """List: one (tenant, priority) class's waiting item ids in a lane, oldest first."""
        return (
            f"{self.scheduler}:bl:{check_name('queue', lane)}:{check_name('tenant', tenant)}:"
            f"{check_priority(priority)}"
        )

    def done(self, item_id: str) -> str:
        """String: "this item already ran through the backlog" (broker redelivery guard)."""
        return f"{self.scheduler}:done:{check_item_id(item_id)}"

    def receipt(self, owner: str) -> str:
        """String: the ids last dispatched to one caller (``dispatch(receipt=...)``)."""
        return f"{self.scheduler}:receipt:{check_item_id(owner)}"

    def waiters(self, scope: str) -> str:
        """Set of ``"<lane> <tenant>"`` parked by a concurrency cap, woken by a release."""
        return f"{self.scheduler}:wake:{Scope.parse(scope)}"

    def transit(self, lane: str, tenant: str) -> str:
        """Sorted set: a tenant's jobs in transit in a lane (enqueued with a hint, not yet
        seen by a gate: in the broker, on RQ's list) -> when the entry lapses (ms). What a
        hint counts as waiting ahead besides the backlog; entries of jobs lost on the way
        lapse on their own (docs/design.md, "Hints")."""
        return f"{self.scheduler}:tr:{check_name('queue', lane)}:{check_name('tenant', tenant)}"

    @property
    def scheduler_prefixes(self) -> SchedulerPrefixes:
        """The prefixes of the scheduler's keys whose user parts only the scripts know."""
        s = self.scheduler
        return SchedulerPrefixes(
            f"{s}:active:",
            f"{s}:parked:",
            f"{s}:n:",
            f"{s}:age:",
            f"{s}:tp:",
            f"{s}:bl:",
            f"{s}:wake:",
            self.tenant_prefix,
            f"{s}:tr:",
        )

    # -- layout 1 (queue-ratelimit 0.1) --------------------------------------------------
    @property
    def legacy_meta(self) -> str:
        """Layout 1's hash of parked and dispatched items: not empty while work a version-1
        process parked is still waiting or running."""
        return f"{self.base}:s:meta"

    # -- reading names back --------------------------------------------------------------
    def parse(self, key: str) -> tuple[str, tuple[str, ...]] | None:
        """The kind and user parts of one of this namespace's key names (``("backlog",
        ("emails", "acme", "high"))``), or None for a name it does not make.

        ``("legacy", (rest,))`` for a key of scheduler layout 1 or its waiters
        (``<base>:cw:<scope>``)."""
        head = f"{self.base}:"
        if not key.startswith(head):
            return None
        rest = key[len(head) :]
        tag, _, tail = rest.partition(":")
        if tag in _FIXED and rest == tag:
            return tag, ()
        if tag in _ONE_PART and tail:
            return _ONE_PART[tag], (tail,)
        if tag in ("s", "cw") and tail:
            return "legacy", (rest,)
        if tag != SCHEDULER_TAG or not tail:
            return None
        tag, _, tail = tail.partition(":")
        if tag in _SCHEDULER_FIXED and not tail:
            return tag, ()
        if tag not in _SCHEDULER_PARTS or not tail:
            return None
        kind, n = _SCHEDULER_PARTS[tag]
        parts = tuple(tail.split(":", n - 1))
        if len(parts) != n or not all(parts):
            return None
        return kind, parts

    def name(self, kind: str, *parts: str) -> str:
        """The key of ``kind`` with ``parts``: the inverse of ``parse`` (not for "legacy")."""
        if kind not in KINDS:
            raise ValueError(f"no key kind {kind!r}")
        if kind in _FIXED or kind in _SCHEDULER_FIXED:
            if parts:
                raise TypeError(f"{kind} takes no parts")
            return str(getattr(self, kind))
        return str(getattr(self, kind)(*parts))


def _lua_number(n: float) -> str:
    """A number as lua/buckets.lua's fmt prints it (into field names)."""
    if n % 1 == 0 and n != 0 and -(2**53) < n < 2**53:
        return str(int(n))
    return f"{n:.17g}"
