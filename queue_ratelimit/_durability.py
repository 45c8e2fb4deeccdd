"""A start-up check: parked work is only as durable as the Redis that holds it."""

from __future__ import annotations

from typing import Any

from redis.exceptions import RedisError


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
