"""Start-up checks: parked work (and the limits) are only as durable as the Redis that holds
them: one that keeps nothing on disk loses them on a restart, one that evicts keys loses them
whenever memory runs short."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import RedisError

from ._errors import ConfigError

log = logging.getLogger("queue_ratelimit")


def persistence_warning(client: Any) -> str | None:
    """A warning to log when the Redis holding parked jobs keeps nothing on disk, else None.

    Workers park throttled jobs in Redis; a server with neither AOF nor RDB snapshots loses
    them when it restarts. A server that refuses ``INFO`` (a managed service, say) gets the
    benefit of the doubt.
    """
    try:
        info = client.info("persistence")
    except RedisError:
        return None
    if int(info.get("aof_enabled", 0)):
        return None
    try:
        save = client.config_get("save").get("save", "")
    except RedisError:
        return None
    if save:
        return (
            "the limiter's Redis has no AOF (appendonly no): parked jobs written since its "
            f"last RDB snapshot (save {save!r}) are lost if it restarts; enable appendonly "
            "for a production queue"
        )
    return (
        "the limiter's Redis keeps nothing on disk (no AOF, no RDB snapshots): parked jobs "
        "are lost if it restarts; enable appendonly for a production queue"
    )


# -- eviction --------------------------------------------------------------------------------

EvictionMode = Literal["warn", "refuse", "ignore"]
EVICTION_MODES: tuple[EvictionMode, ...] = ("warn", "refuse", "ignore")


@dataclass(frozen=True, slots=True)
class EvictionStatus:
    """What the limiter's Redis does when it runs out of memory.

    Attributes:
        policy: its ``maxmemory-policy`` (``noeviction``, ``allkeys-lru``, ...), None when
            the server would not say (``INFO`` and ``CONFIG`` both refused).
        maxmemory: its ``maxmemory`` in bytes (0: no limit, so nothing is ever evicted),
            None when unknown.
    """

    policy: str | None
    maxmemory: int | None

    @property
    def evicting(self) -> bool:
        """True when the server may drop keys: an evicting policy under a memory limit."""
        return self.policy not in (None, "noeviction") and self.maxmemory != 0

    def as_dict(self) -> dict[str, object]:
        return {"policy": self.policy, "maxmemory": self.maxmemory, "evicting": self.evicting}

    def warning(self) -> str:
        """What an evicting policy puts at risk, for the log."""
        policy = self.policy or ""
        if policy.startswith("volatile-"):
            at_risk = (
                "keys with a TTL: bucket state (a lost bucket reads as full, so limits admit "
                "extra work), concurrency slots (caps exceeded) and redelivery guards (jobs "
                "run twice)"
            )
        else:
            at_risk = (
                "any key: parked jobs (lost without a trace), the limits themselves, bucket "
                "state and concurrency slots"
            )
        limit = "" if self.maxmemory is None else f", maxmemory {self.maxmemory} bytes"
        return (
            f"the limiter's Redis evicts keys when memory runs short (maxmemory-policy "
            f"{policy}{limit}), which drops {at_risk}; give the limiter a Redis with "
            f"maxmemory-policy noeviction (writes then fail loudly instead), or pass "
            f"eviction='ignore' to accept this"
        )


def _status(info: Any, conf: Any) -> EvictionStatus:
    """The status from an ``INFO memory`` reply, else a ``CONFIG GET maxmemory*`` reply
    (a cluster client's replies come per node: the first evicting node's, if any)."""
    for reply, policy_field in ((info, "maxmemory_policy"), (conf, "maxmemory-policy")):
        if not isinstance(reply, dict):
            continue
        nodes = [v for v in reply.values() if isinstance(v, dict)] or [reply]
        found = [
            EvictionStatus(str(n[policy_field]), _int(n.get("maxmemory")))
            for n in nodes
            if n.get(policy_field) is not None
        ]
        if found:
            return next((s for s in found if s.evicting), found[0])
    return EvictionStatus(None, None)


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def eviction_status(client: Any) -> EvictionStatus:
    """Ask the server (one ``INFO memory``; ``CONFIG GET`` if INFO is refused). A server
    that refuses both, or cannot be reached, gives an unknown status."""
    try:
        return _status(client.info("memory"), None)
    except RedisError:
        pass
    try:
        return _status(None, client.config_get("maxmemory*"))
    except RedisError:
        return EvictionStatus(None, None)


async def aeviction_status(client: Any) -> EvictionStatus:
    """``eviction_status`` for an asyncio client."""
    try:
        return _status(await client.info("memory"), None)
    except RedisError:
        pass
    try:
        return _status(None, await client.config_get("maxmemory*"))
    except RedisError:
        return EvictionStatus(None, None)


def check_eviction_mode(mode: object) -> EvictionMode:
    """The ``eviction`` setting if it is one, else ``ConfigError``."""
    if mode not in EVICTION_MODES:
        raise ConfigError(f"eviction must be 'warn', 'refuse' or 'ignore', got {mode!r}")
    return mode


def judge_eviction(status: EvictionStatus, mode: EvictionMode) -> EvictionStatus:
    """Act on a status by the ``eviction`` setting: log a warning (``"warn"``) or raise
    ``ConfigError`` (``"refuse"``) when the server evicts."""
    if status.evicting and mode != "ignore":
        if mode == "refuse":
            raise ConfigError(f"refusing to run (eviction='refuse'): {status.warning()}")
        log.warning("queue-ratelimit: %s", status.warning())
    return status
