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
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from ._async_breaker import async_guarded_client
from ._breaker import DEFAULT_BACKOFF, Backoff, check_backoff, guarded_client

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
) -> redis.Redis:
    """A client for ``url`` whose connects and replies wait at most ``timeout`` seconds
    (None: redis-py's defaults, no bound). Timeouts set in the URL
    (``?socket_timeout=5&socket_connect_timeout=1``) win over ``timeout``.

    After a call has waited out its timeout, calls fail at once (an outage) until Redis
    answers a probe, sent ``backoff[0]`` seconds later, then at intervals doubling up to
    ``backoff[1]`` (None: every call waits out its own timeout)."""
    if backoff is None or timeout is None:
        return redis.Redis.from_url(url, **_options(timeout, Retry))
    return guarded_client(url, check_backoff(backoff), **_options(timeout, Retry))


def async_redis_client(
    url: str, timeout: float | None = REDIS_TIMEOUT, backoff: Backoff | None = DEFAULT_BACKOFF
) -> redis.asyncio.Redis:
    """``redis_client`` for asyncio. Its breaker has no thread: while Redis is known down,
    the first call after each back-off window is the probe, and the others fail at once."""
    if backoff is None or timeout is None:
        return redis.asyncio.Redis.from_url(url, **_options(timeout, AsyncRetry))
    return async_guarded_client(url, check_backoff(backoff), **_options(timeout, AsyncRetry))
