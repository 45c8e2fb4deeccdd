"""The Redis clients queue-ratelimit makes itself: every wait on the server is bounded.

A Redis that stops answering (SIGSTOPped, a frozen VM, a TLS handshake that never ends)
without closing its sockets would otherwise block each caller for as long as it stays
silent, and the fail mode would never engage. Clients passed in by the caller are theirs,
and used as they are.

A call that waits out the timeout also opens the client's breaker (``_breaker``): for a
back-off window the next calls fail at once, as an outage, while a probe in the background
finds out when Redis answers again.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis._parsers import CommandsParser
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from ._async_breaker import async_guarded_client
from ._breaker import DEFAULT_BACKOFF, Backoff, check_backoff, guarded_client, node_pool_class
from ._errors import BackendUnavailable, ConfigError
from ._urls import is_cluster_url, mask_url, node_url

# Seconds to connect, and to wait for any one reply, before a call gives up and the caller's
# fail mode decides. No command of this package blocks on the server (RQ's dequeue blocks
# at most 0.5 s per call), so a healthy server answers far sooner.
REDIS_TIMEOUT = 2.0


def _options(timeout: float | None, retry: Any) -> dict[str, Any]:
    if timeout is None:
        return {}
    # A dropped connection (a restart, an idle socket closed) is retried once at once; a
    # timeout is not retried: the server is not answering, and a script that did run would
    # run twice (redis-py's default makes four attempts with growing pauses in between).
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry(
            ExponentialWithJitterBackoff(base=0.05, cap=0.1), 1, (RedisConnectionError,)
        ),
    }


def redis_client(
    url: str, timeout: float | None = REDIS_TIMEOUT, backoff: Backoff | None = DEFAULT_BACKOFF
) -> redis.Redis | RedisCluster:
    """A client for ``url`` whose connects and replies wait at most ``timeout`` seconds
    (None: redis-py's defaults, no bound). Timeouts set in the URL
    (``?socket_timeout=5&socket_connect_timeout=1``) win over ``timeout``.

    After a call has waited out its timeout, calls fail at once (an outage) until Redis
    answers a probe, sent ``backoff[0]`` seconds later, then at intervals doubling up to
    ``backoff[1]`` (None: every call waits out its own timeout).

    A cluster URL (``redis+cluster://host:port``, any node) gives a ``RedisCluster``
    whose primaries each have their own breaker: one that stops answering is an outage for
    the calls to its slots only."""
    if is_cluster_url(url):
        return cluster_client(url, timeout, backoff)
    if backoff is None or timeout is None:
        return redis.Redis.from_url(url, **_options(timeout, Retry))
    return guarded_client(url, check_backoff(backoff), **_options(timeout, Retry))


def cluster_client(
    url: str, timeout: float | None = REDIS_TIMEOUT, backoff: Backoff | None = DEFAULT_BACKOFF
) -> RedisCluster:
    """``redis_client`` for a Redis Cluster: ``url`` names any node (its plain or cluster
    scheme); the client finds the others and follows the slots as they move."""
    options = _options(timeout, Retry)
    if backoff is not None and timeout is not None:
        options["connection_pool_class"] = node_pool_class(check_backoff(backoff))
    # The cluster client retries at its own level (its nodes' clients do not): once at
    # once, as a plain client does, not redis-py's default of 3 with pauses of up to 10 s.
    try:
        client = RedisCluster.from_url(node_url(url), **options)
    except RedisClusterException as exc:
        # (The client asks the node it is given for the others as it is made: with that node
        # down there is no client yet, and this is an outage like any other.)
        raise BackendUnavailable(
            f"Redis Cluster unreachable through {mask_url(url)}: {exc}"
        ) from exc
    read_function_keys_locally(client)
    return client


def read_function_keys_locally(client: Any) -> None:
    """Have a sync ``RedisCluster`` read an ``FCALL``'s keys from its arguments
    (``_FunctionKeysParser``), whoever made it; any other client is left as it is."""
    parser = getattr(client, "commands_parser", None)
    if isinstance(client, RedisCluster) and type(parser) is CommandsParser:
        # (The parser has no state of its own beyond its base's: its class can be swapped.)
        parser.__class__ = _FunctionKeysParser


class _FunctionKeysParser(CommandsParser):
    """redis-py's key parser for a cluster client, reading an ``FCALL``'s keys from its
    arguments (as redis-py does for ``EVAL``) instead of asking the cluster's default node
    (``COMMAND GETKEYS``) before each call: with that node stopped, every script call, to
    whichever primary, failed or waited out its timeout, and the gate rested the healthy
    primaries' tenants with the stopped one's (docs/reliability.md)."""

    def get_keys(self, redis_conn: Any, *args: Any) -> Any:
        if len(args) > 2 and str(args[0]).upper() in ("FCALL", "FCALL_RO"):
            return list(args[3 : 3 + int(args[2])])
        return super().get_keys(redis_conn, *args)  # type: ignore[no-untyped-call]


def async_redis_client(
    url: str, timeout: float | None = REDIS_TIMEOUT, backoff: Backoff | None = DEFAULT_BACKOFF
) -> redis.asyncio.Redis:
    """``redis_client`` for asyncio. Its breaker has no thread: while Redis is known down,
    the first call after each back-off window is the probe, and the others fail at once.
    Not for a cluster URL (``ConfigError``)."""
    if is_cluster_url(url):
        raise ConfigError(
            f"{mask_url(url)}: a cluster URL is for the sync clients only (Limiter, the "
            "integrations, the CLI), not for AsyncLimiter.from_url"
        )
    if backoff is None or timeout is None:
        return redis.asyncio.Redis.from_url(url, **_options(timeout, AsyncRetry))
    return async_guarded_client(url, check_backoff(backoff), **_options(timeout, AsyncRetry))


def queue_time(pipe: Any, key: str) -> None:
    """Queue ``TIME`` on ``pipe``, answered by the server that holds ``key``: a cluster
    pipeline routes each command by its key and refuses ``TIME`` (it has none), so there it
    is sent by name to ``key``'s primary (whose clock the scripts on ``key`` read)."""
    if not isinstance(pipe, ClusterPipeline):
        pipe.time()
        return
    cluster: Any = pipe  # (redis-py's cluster methods carry no types)
    cluster.execute_command("TIME", target_nodes=cluster.get_node_from_key(key))
