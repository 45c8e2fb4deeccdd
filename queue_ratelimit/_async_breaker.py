"""The client's breaker (``_breaker``) for ``redis.asyncio`` clients: ``AsyncLimiter``'s.

Once a call has waited out its timeout, the pool refuses connections at once (``RedisDown``:
an outage, the fail mode applies) for a back-off window. No thread and no task probes: the
first caller after each window is let through as the probe, on the event loop like any call,
and the others are refused meanwhile; its outcome (an answer, another timeout, or no call
at all) closes the breaker or doubles the window. The state machine is ``BreakerCore``, the
sync breaker's; it needs no lock here, since every step runs on the event loop between two
awaits.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._breaker import Backoff, BreakerCore, RedisDown


class _AsyncGuarded:
    """Mixed into a ``redis.asyncio`` connection class: a call that waits out its timeout
    (to connect, write or read) opens the breaker, told once per call (a handshake's read
    that timed out fails the connect too); any answer while it is open (the probe's, or one
    to a call sent before) closes it."""

    breaker: BreakerCore
    _heard = False  # the breaker was told of this connect's timeout already

    async def connect(self, *args: Any, **kwargs: Any) -> Any:
        self._heard = False
        try:
            return await super().connect(*args, **kwargs)  # type: ignore[misc]
        except RedisTimeoutError:
            if not self._heard:
                self.breaker.failed()
            raise
        except (RedisError, OSError):
            # Refused or dropped at once: nothing to wait for (a stopped server's kernel
            # still accepts connections, so this is a server that is gone or restarting).
            self.breaker.ok()
            raise

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().send_packed_command(*args, **kwargs)  # type: ignore[misc]
        except RedisTimeoutError:
            self._timed_out()
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            reply = await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except RedisTimeoutError:
            self._timed_out()
            raise
        except (RedisError, OSError):
            self.breaker.ok()  # an error reply, or a dropped connection: an answer at once
            raise
        # (None under a timeout of the caller's own is no answer: pub/sub polling.)
        if reply is not None or kwargs.get("timeout") is None:
            self.breaker.ok()
        return reply

    def _timed_out(self) -> None:
        self._heard = True
        self.breaker.failed()


class AsyncGuardedPool(ConnectionPool):
    """A ``redis.asyncio`` pool that refuses connections at once while its breaker says
    Redis is down, but for one probe per back-off window. Made by ``async_guarded_client``."""

    breaker: BreakerCore
    _probe: Any = None  # the connection handed to the probing caller, until released

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        breaker = self.breaker
        probing = breaker.down_since is not None
        if not breaker.allow():
            raise RedisDown(breaker.refusal())
        if not probing:  # the hot path
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        try:
            conn = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except BaseException:
            # Failed before any call (a timeout or an answer told the breaker already):
            # whatever happened, the next caller may probe once the window allows.
            breaker.release()
            raise
        self._probe = conn
        return conn

    async def release(self, connection: Any) -> None:
        if connection is self._probe:
            # The probing caller is done: if its call neither timed out nor got an answer
            # (cancelled, or never sent), the next caller after the window probes instead.
            self._probe = None
            self.breaker.release()
        await super().release(connection)


def async_guarded_client(url: str, backoff: Backoff, **options: Any) -> redis.asyncio.Redis:
    """``redis.asyncio.Redis.from_url(url, **options)`` whose pool has a breaker."""
    pool = AsyncGuardedPool.from_url(url, **options)
    base = pool.connection_class
    kwargs = pool.connection_kwargs
    where = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    breaker = BreakerCore(backoff, name=str(where))
    pool.breaker = breaker
    pool.connection_class = type(
        f"Guarded{base.__name__}", (_AsyncGuarded, base), {"breaker": breaker}
    )
    return redis.asyncio.Redis.from_pool(pool)  # (closing the client closes the pool)


def async_breaker_of(client: Any) -> BreakerCore | None:
    """The breaker of a client ``async_guarded_client`` made; None for any other."""
    pool = getattr(client, "connection_pool", None)
    return pool.breaker if isinstance(pool, AsyncGuardedPool) else None
