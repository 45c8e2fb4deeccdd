"""Calls to Redis that the consumer's event loop writes and reads without waiting for them.

The gate's work per message is a few scheduler calls (park it, hand it out again, close its
record). Waited for one by one, each stalls the consumer for a round trip plus the script's
run on the server, and the consumer is the one thread that feeds the whole worker. So they go
on a connection of their own, and the event loop does the waiting:

- what is sent during one turn of the loop is written in one go just before the loop waits
  again (the hub's ``on_tick``): on a busy machine each write, a system call that wakes the
  server, costs more than the calls it carries;
- a write never blocks: what the socket cannot take now is written on a later turn of the
  loop (a busy server reads slowly, and a blocking write would stall the consumer just the
  same; kombu's hub cannot watch one socket for reading and writing at once);
- each reply is read when it arrives, and handed to whoever sent the call. Replies on one
  connection come back in the order the calls were sent, so one FIFO of callbacks is all the
  bookkeeping there is.

Without an event loop (``hub=None``) calls are written at once and replies read on ``poll``
or ``drain``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from .._breaker import breaker_of

log = logging.getLogger("queue_ratelimit.celery")

# A reply: a value, or the ResponseError the server answered one call with.
Reply = Any
# Called with the replies of one ``send`` (in order), or with the RedisError that lost them:
# ``NotSent`` when none of the calls reached Redis, any other when the connection failed
# after they were written (whether they ran is unknown).
OnReply = Callable[[list[Reply] | RedisError], None]


# Seconds a send may wait for its replies before the connection counts as hung, unless the
# client's socket timeout is longer (see ``Wire.stall_limit``).
WIRE_STALL = 10.0


class NotSent(RedisConnectionError):
    """The calls never reached Redis (it could not be reached, or the wire was closed
    first, or it is known not to answer now): nothing of them ran."""


def _connection_error(exc: BaseException) -> RedisError:
    return exc if isinstance(exc, RedisError) else RedisConnectionError(str(exc) or repr(exc))


class Wire:
    """One connection to Redis; calls are sent now and their replies handled later.

    Callbacks run on the thread that reads, the consumer's (the event loop, or whoever calls
    ``poll`` and ``drain``).
    """

    def __init__(self, client: redis.Redis, hub: Any = None, min_stall: float = WIRE_STALL) -> None:
        self.client = client
        self.min_stall = min_stall
        self.hub: Any = None
        self._conn: Any = None  # a redis-py Connection
        self._fd: int | None = None
        # (replies due, callback, when sent) per send, oldest first.
        self._pending: deque[tuple[int, OnReply, float]] = deque()
        # Sends of this turn of the event loop, written together by ``flush``.
        self._outbox: list[tuple[Sequence[Sequence[Any]], OnReply]] = []
        # Bytes of sent calls that the socket has not taken yet.
        self._unsent = bytearray()
        # Replies read so far of the oldest send (its callback wants them all at once).
        self._partial: list[Reply] = []
        self.writes = 0
        # The client's breaker (``queue_ratelimit._breaker``): while it says Redis does not
        # answer, calls are refused at once (not sent), like the client's own.
        self.breaker = breaker_of(client)
        self.attach(hub)

    def attach(self, hub: Any) -> None:
        """Use ``hub`` (Celery's event loop; None: none) from now on."""
        self.detach()
        self.hub = hub
        if hub is not None:
            hub.on_tick.add(self.flush)

    def detach(self) -> None:
        """Stop using the event loop (after ``close``: the worker is stopping)."""
        if self.hub is not None:
            self.hub.on_tick.discard(self.flush)
            self.hub = None

    @property
    def pending(self) -> int:
        """Sends whose replies are not read yet."""
        return len(self._pending) + len(self._outbox)

    def send(self, commands: Sequence[Sequence[Any]], on_reply: OnReply) -> None:
        """Send ``commands`` (one round trip); ``on_reply`` gets their replies later, or
        the RedisError that lost them (also when they could not be written).

        With an event loop they are written before it next waits, with whatever else was
        sent until then; without one, now.
        """
        if not commands:
            on_reply([])
            return
        self._outbox.append((commands, on_reply))
        if self.hub is None:
            self.flush()

    def groups(self, keys: Sequence[Sequence[str]]) -> list[list[int]]:
        """Calls that may go in one send, by position: all of them (one server holds every
        slot; ``ClusterWire`` groups them by slot)."""
        return [list(range(len(keys)))] if keys else []

    def flush(self) -> None:
        """Write every send made since the last write, in one go (runs on the loop each
        turn, and from the gate's timer: it also writes what the socket refused before)."""
        outbox, self._outbox = self._outbox, []
        if not outbox:
            if self._unsent and self._conn is not None:
                self._write()
            return
        if self.breaker is not None and not self.breaker.allow():
            # Known not to answer: refused without a write (what is pending stays so).
            refused = NotSent(self.breaker.refusal())
            for _, on_reply in outbox:
                self._call(on_reply, refused)
            return
        try:
            conn = self._connection()
            packed = conn.pack_commands([c for commands, _ in outbox for c in commands])
        except Exception as exc:  # on the event loop: nothing may escape
            if not isinstance(exc, RedisError | OSError):
                log.exception("queue-ratelimit: could not send calls to Redis")
            self._fail(_connection_error(exc))
            error = NotSent(str(exc) or repr(exc))
            for _, on_reply in outbox:
                self._call(on_reply, error)
            return
        now = time.monotonic()
        self._pending.extend((len(commands), on_reply, now) for commands, on_reply in outbox)
        for chunk in packed:
            self._unsent += chunk
        self.writes += 1
        self._write()

    def stalled_for(self) -> float:
        """Seconds the oldest unanswered send has waited (0 when none is pending); past the
        connection's timeout, the breaker hears that Redis does not answer."""
        if not self._pending:
            return 0.0
        stalled = time.monotonic() - self._pending[0][2]
        timeout = getattr(self._conn, "socket_timeout", None)
        if self.breaker is not None and timeout is not None and stalled > timeout:
            self.breaker.failed()
        return stalled

    @property
    def stall_limit(self) -> float:
        """Seconds the oldest send may wait for its replies before the connection counts as
        hung: ``min_stall``, or the client's socket timeout if that is longer (a reply its
        other calls would still wait for is not given up on).

        Not the timeout itself: the breaker already hears of a stall at the timeout (new
        work meets the fail mode at once), while a connection kept through a short stall of
        the server gets its replies when the server goes on; dropped, every call on it is
        in doubt and is settled again once Redis answers (docs/tuning.md).
        """
        kwargs = getattr(self.client.connection_pool, "connection_kwargs", {})
        timeout = kwargs.get("socket_timeout") or 0.0
        return max(self.min_stall, float(timeout))

    def drop_if_hung(self) -> float:
        """Read the replies that have come (a busy event loop may not have yet), then drop
        the connection if the oldest send has still waited longer than ``stall_limit``:
        its callers learn that their calls are in doubt, and the next send connects again.
        The seconds it waited; 0 if kept."""
        self.poll()
        stalled = self.stalled_for()
        if stalled <= self.stall_limit:
            return 0.0
        self.close()
        return stalled

    def poll(self) -> None:
        """Handle every reply already received, without waiting for the others."""
        while self._pending and self._conn is not None:
            try:
                ready = self._conn.can_read(timeout=0)
            except (RedisError, OSError) as exc:
                self._fail(_connection_error(exc))
                return
            if not ready:
                return
            self._read_reply()

    def drain(self) -> None:
        """Wait for and handle every pending reply (e.g. before the worker stops)."""
        self.flush()
        while self._pending and self._conn is not None:
            self._read_reply()

    def close(self) -> None:
        """Drop the connection; callers still waiting are told it was lost (and what was
        not written yet is not sent)."""
        outbox, self._outbox = self._outbox, []
        self._fail(RedisConnectionError("queue-ratelimit: connection closed"))
        for _, on_reply in outbox:
            self._call(on_reply, NotSent("queue-ratelimit: connection closed before writing"))

    # -- internals -------------------------------------------------------------------------
    def _write(self) -> None:
        """Hand the socket what it takes now; the rest when it is writable again."""
        if self.hub is None:
            try:
                self._conn._sock.sendall(self._unsent)
            except OSError as exc:
                self._fail(_connection_error(exc))
                return
            self._unsent.clear()
            return
        sock = self._conn._sock
        # Non-blocking for these writes only: with a timeout, Python would wait for room
        # first, and redis-py's reads expect the connection's own timeout.
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            while self._unsent:
                sent = sock.send(self._unsent)
                del self._unsent[:sent]
        except (BlockingIOError, InterruptedError):
            return  # the socket is full: the rest goes on a later turn (flush)
        except OSError as exc:
            self._fail(_connection_error(exc))
        finally:
            if self._conn is not None:
                sock.settimeout(timeout)

    def _read_reply(self) -> None:
        """Read one reply (waiting for it, with the connection's timeout); hand the oldest
        send's replies to its callback once they are all in."""
        try:
            if self._unsent:
                # The rest of the calls must be out before their replies can come.
                self._conn._sock.sendall(self._unsent)
                self._unsent.clear()
            try:
                reply = self._conn.read_response()
            except ResponseError as exc:
                reply = exc
        except (RedisError, OSError) as exc:
            self._fail(_connection_error(exc))
            return
        count, on_reply, _ = self._pending[0]
        self._partial.append(reply)
        if len(self._partial) == count:
            replies, self._partial = self._partial, []
            self._pending.popleft()
            self._call(on_reply, replies)

    def _on_readable(self) -> None:
        # Called by the event loop: an exception here would stop the consumer.
        try:
            if not self._pending:
                # Nothing expected: the server closed the connection (or sent garbage).
                self._fail(RedisConnectionError("unexpected data from Redis"))
                return
            self.poll()
            if self._unsent and self._conn is not None:
                self._write()  # the server is reading: room again, likely
        except Exception:  # pragma: no cover - a callback's bug must not stop the consumer
            log.exception("queue-ratelimit: error handling a Redis reply")

    def _call(self, on_reply: OnReply, result: list[Reply] | RedisError) -> None:
        try:
            on_reply(result)
        except Exception:
            log.exception("queue-ratelimit: error handling a Redis reply")

    def _connection(self) -> Any:
        if self._conn is None:
            conn: Any = self.client.connection_pool.make_connection()
            # One attempt: a failure reaches the callers (NotSent) and the breaker. The
            # client's retry policy would sleep through its backoff on the event loop
            # (about 10 s against a server that refuses, with redis-py's default policy).
            conn.retry = Retry(NoBackoff(), 0)
            conn.connect()
            self._conn = conn
            self._fd = conn._sock.fileno()
            if self.hub is not None:
                # Replies are read when the loop sees them arrive.
                self.hub.add_reader(self._fd, self._on_readable)
        return self._conn

    def _fail(self, exc: RedisError) -> None:
        """The connection is gone: every pending caller learns its calls are in doubt."""
        conn, self._conn = self._conn, None
        if self._fd is not None and self.hub is not None:
            with contextlib.suppress(KeyError, OSError, ValueError):
                self.hub.remove_reader(self._fd)
        self._fd = None
        self._unsent.clear()
        self._partial = []
        if conn is not None:
            with contextlib.suppress(RedisError, OSError):
                conn.disconnect()
        pending, self._pending = self._pending, deque()
        for _, on_reply, _ in pending:
            self._call(on_reply, exc)
