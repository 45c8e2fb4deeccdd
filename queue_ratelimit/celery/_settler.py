"""Settling re-admitted jobs without waiting for Redis's answer each time.

Celery acknowledges a job from its event loop, once per job; closing the job's in-flight
record is one scheduler call. Waiting for each reply would stall the loop a round trip per
job, so the call is written to a connection of its own at once (the same moment a waited-for
call would have been sent: a worker killed right after still has it on the wire) and the
replies are read later, in one go, when the gate next looks at the backlog.
"""

from __future__ import annotations

from typing import Any, Literal

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._scheduler import DispatchedItem, FairScheduler

# How a re-admitted job's in-flight record is closed: ran (remembered as done), back to
# the head of its backlog, or dropped (an invalid message).
Settlement = Literal["ack", "requeue", "drop"]
# Replies left unread before the settler reads them all (bounds what a lost connection can
# leave in doubt, and the socket buffers).
MAX_PENDING = 64


class AsyncSettler:
    """Sends settlements now, reads their replies later, on a connection of its own.

    Only for plain ``redis.Redis`` clients on a server with Functions (the scheduler's
    ``FCALL``); ``usable`` says so, and the gate settles the ordinary way otherwise.
    """

    def __init__(self, scheduler: FairScheduler) -> None:
        self.scheduler = scheduler
        self._conn: Any = None
        self._pending: list[tuple[str, Settlement]] = []

    @property
    def usable(self) -> bool:
        scripts = self.scheduler._scripts
        return (
            bool(scripts._direct)
            and scripts.transport == "fcall"
            and isinstance(self.scheduler.client, redis.Redis)
        )

    @property
    def pending(self) -> int:
        return len(self._pending)

    def send(
        self, item: str | DispatchedItem, how: Settlement, remember: float, keep_slot: bool
    ) -> None:
        """Write the settlement; its outcome comes from ``collect``.

        Raises:
            RedisError: it could not be written (nothing is pending for it).
        """
        keys, args = self.scheduler.settle_call(item, how, remember, keep_slot=keep_slot)
        function = self.scheduler._scripts.functions["scheduler.lua"]
        conn = self._connection()
        try:
            conn.send_packed_command(conn.pack_command("FCALL", function, len(keys), *keys, *args))
        except RedisError:
            self._drop_connection()
            raise
        self._pending.append((item.id if isinstance(item, DispatchedItem) else item, how))

    def collect(self) -> list[tuple[str, Settlement, bool | None]]:
        """Read every pending reply: (item id, settlement, closed); closed is None when the
        outcome is unknown (the connection failed, or the server refused the call): the
        caller settles it again the ordinary way."""
        found: list[tuple[str, Settlement, bool | None]] = []
        pending, self._pending = self._pending, []
        if self._conn is None:
            # A later send broke the connection these were written on: in doubt.
            return [(i, h, None) for i, h in pending]
        for n, (item_id, how) in enumerate(pending):
            try:
                reply = self._conn.read_response()
            except ResponseError:
                found.append((item_id, how, None))  # e.g. the library is gone: try again
                continue
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self._drop_connection()
                found += [(i, h, None) for i, h in pending[n:]]
                break
            found.append((item_id, how, reply == 1))
        return found

    def close(self) -> None:
        self._drop_connection()
        self._pending.clear()

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self.scheduler.client.connection_pool.make_connection()
            self._conn.connect()
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.disconnect()
            finally:
                self._conn = None
