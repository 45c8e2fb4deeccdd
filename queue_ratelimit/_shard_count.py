"""The shard count a namespace is used with, recorded at its home (docs/design.md,
"Shards": "One count per namespace").

Each count puts a tenant in a slot of its own (``shard_of``: ``{ns}``, ``{ns:i}`` ...), so
processes using one namespace with different counts would each keep their own buckets
for a tenant and admit the limit once per count, without a word. So the first limiter of
a namespace records its count in the home configuration hash (field ``_shards``, with
``HSETNX``: of two processes racing with different counts exactly one records its own,
and the other reads it and is refused), and every limiter checks it before its first
script call (``Scripts.before_first_call``: a decision, a dispatch, a configuration
write), once per process. A sharded limiter looks again at each rebalance tick, in the
round trip that tries the rebalance lock, so a count re-recorded while it runs stops it
too. Fields starting with ``_`` are internal: no reader of the configuration lists them
and ``lua/shards.lua`` copies none to the shards.
"""

from __future__ import annotations

from typing import Any

from ._core import AUDIT_LENGTH
from ._errors import BackendError, ConfigError, ShardCountMismatch
from ._keys import DEFAULT_PREFIX, KeySpace, check_shards
from ._scopes import _shown

SHARDS_FIELD = "_shards"


def queue_shard_record(pipe: Any, keys: KeySpace, shards: int) -> None:
    """Record ``shards`` unless a count is recorded already, then read the one recorded
    (two replies on ``pipe``, sync or asyncio: queueing is the same)."""
    pipe.hsetnx(keys.config, SHARDS_FIELD, shards)
    pipe.hget(keys.config, SHARDS_FIELD)


def recorded_count(value: object) -> int | None:
    """The count stored in ``_shards`` (None when none is), else ``BackendError``."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    try:
        return check_shards(int(text))
    except (ValueError, BackendError):
        raise BackendError(f"queue-ratelimit: corrupt {SHARDS_FIELD}: {_shown(text)}") from None


def judge_shards(keys: KeySpace, shards: int, recorded: object) -> None:
    """``ShardCountMismatch`` when the namespace is recorded with another count."""
    count = recorded_count(recorded)
    if count is not None and count != shards:
        raise ShardCountMismatch(keys.namespace, count, shards)


def record_shards(
    client: Any,
    namespace: str,
    shards: int,
    *,
    force: bool = False,
    prefix: str = DEFAULT_PREFIX,
    actor: str = "api",
) -> int | None:
    """Record the shard count of a namespace (``queue-ratelimit shards set``); returns the
    count recorded before (None: none was).

    A different count already recorded is replaced only with ``force`` (and the change is
    in the audit log), and only once no work waits under it: work parked or in flight
    under one count is served only by processes using that count, so first stop the
    processes using it and let their fair backlogs drain (or purge them). The buckets
    start anew under the new count (a burst once more).

    Raises:
        ConfigError: a bad count, or work still waiting under the recorded count;
            ``ShardCountMismatch`` when another count is recorded and no ``force``.
    """
    keys = KeySpace(prefix, namespace)
    n = check_shards(shards)
    with client.pipeline(transaction=False) as pipe:
        queue_shard_record(pipe, keys, n)
        pipe.hget(keys.config, "_version")
        pipe.time()
        recorded_now, current, version, (seconds, micros) = pipe.execute()
    if recorded_now:
        return None
    old = recorded_count(current)
    assert old is not None  # (HSETNX found the field)
    if old != n:
        if not force:
            raise ShardCountMismatch(namespace, old, n)
        waiting = waiting_under(client, KeySpace(prefix, namespace, None, old))
        if waiting:
            raise ConfigError(
                f"namespace {namespace!r}: {waiting} item(s) wait in the fair backlog or in "
                f"flight under its {old} shard(s), which only processes using {old} serve: "
                f"let workers with shards={old} drain them (or purge them: queue-ratelimit "
                f"--namespace {namespace} --shards {old} backlog purge), then record {n}"
            )
        with client.pipeline(transaction=True) as pipe:
            pipe.hset(keys.config, SHARDS_FIELD, n)
            entry = {
                "version": int(version or 0),
                "op": "set",
                "field": SHARDS_FIELD,
                "old": old,
                "new": n,
                "actor": actor,
                "at_ms": seconds * 1000 + micros // 1000,
            }
            pipe.xadd(keys.audit, entry, maxlen=AUDIT_LENGTH, approximate=True)
            pipe.execute()
    return old


def waiting_under(client: Any, home: KeySpace) -> int:
    """Items parked in the fair backlogs or in flight in every layout of ``home``'s
    count (its own keys for one shard, else each shard's)."""
    spaces = [home] if home.shards == 1 else [home.for_shard(i) for i in range(home.shards)]
    with client.pipeline(transaction=False) as pipe:
        for keys in spaces:
            pipe.smembers(keys.lanes)
            pipe.zcard(keys.inflight)
        replies = pipe.execute()
    total = sum(int(n) for n in replies[1::2])
    with client.pipeline(transaction=False) as pipe:
        for keys, lanes in zip(spaces, replies[::2], strict=True):
            for lane in lanes:
                pipe.hget(keys.counts(lane.decode() if isinstance(lane, bytes) else lane), ":total")
        total += sum(int(n or 0) for n in pipe.execute())
    return total
