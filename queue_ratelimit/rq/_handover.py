"""What a worker process may hold while it moves a job into RQ's hands: lost replies, a
shutdown that must wait."""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._errors import BackendError, BackendUnavailable

try:
    from rq.exceptions import StopRequested
except ImportError:  # RQ < 2.1 keeps it in the worker module
    from rq.worker import StopRequested  # type: ignore[attr-defined, no-redef]

# After these a command may have run on the server without its reply reaching us (or, for
# a script that failed part way, without all of it done): a job moved meanwhile may be in
# this process's hands, unknown to RQ. The scheduler raises our errors, redis-py its own.
LOST_REPLY = (RedisConnectionError, RedisTimeoutError, BackendUnavailable, BackendError)


@dataclass(frozen=True, slots=True)
class Claim:
    """A job this process may have been handed without knowing it; settled at its next dequeue.

    Attributes:
        queue: the queue's name; None when only the job knows it (its origin).
        job_id: the job; None when only a dispatch receipt knows it (see ``nonce``).
        nonce: the dispatch whose reply was lost.
        gated: its tokens were taken (it was dispatched); otherwise it passes the gate again.
        listed: it was moved onto the queue's intermediate list (single-queue workers).
    """

    queue: str | None
    job_id: str | None
    nonce: str | None = None
    gated: bool = True
    listed: bool = True


class Holding:
    """Per process: the claims of each Redis connection, and whether a job is being moved.

    A job moved onto RQ's intermediate list (or popped off RQ's list) belongs to this
    process until the worker starts it. Two things can strand it there: a lost reply (the
    command ran, the answer never came) and a warm-shutdown signal whose handler raises
    mid-move. The first leaves a claim that the next dequeue settles; the second is deferred
    by our workers until the job is handed over (signal handlers run in the main thread,
    where RQ dequeues).
    """

    def __init__(self) -> None:
        self._claims: dict[int, list[Claim]] = {}
        self._nonces = itertools.count(1)
        self._owner: tuple[int, str] | None = None
        self.moving = 0
        self.stop_deferred = False

    def owner(self) -> str:
        """A name for this process's dispatch receipts (a fresh one after a fork)."""
        pid = os.getpid()
        if self._owner is None or self._owner[0] != pid:
            self._owner = (pid, f"rq-{uuid.uuid4().hex}")
        return self._owner[1]

    def nonce(self) -> str:
        return str(next(self._nonces))

    def claims(self, connection: Any) -> list[Claim]:
        return list(self._claims.get(id(connection), ()))

    def claim(self, connection: Any, claim: Claim) -> None:
        claims = self._claims.setdefault(id(connection), [])
        if claim not in claims:  # (a claim settled again, and failing again, is one claim)
            claims.append(claim)

    def settle(self, connection: Any, claim: Claim, *more: Claim) -> None:
        """Replace ``claim`` by ``more`` (what it turned out to be), or drop it."""
        claims = self._claims.get(id(connection), [])
        claims.remove(claim)
        claims.extend(more)
        if not claims:
            self._claims.pop(id(connection), None)

    @contextmanager
    def moving_job(self) -> Iterator[None]:
        """A section in which a warm shutdown waits (our workers' ``_shutdown``)."""
        self.moving += 1
        try:
            yield
        finally:
            self.moving -= 1

    def pause(self, seconds: float) -> None:
        """Sleep holding nothing: a warm shutdown may interrupt it (and one waiting, does)."""
        self.check_stop()
        self.moving -= 1
        try:
            time.sleep(seconds)
        finally:
            self.moving += 1

    def check_stop(self) -> None:
        """Raise the ``StopRequested`` deferred while a job was being moved."""
        if self.stop_deferred:
            self.stop_deferred = False
            raise StopRequested()

    def defer_stop(self) -> bool:
        """For a worker's signal handler: True if the stop must wait for the move to end."""
        if self.moving:
            self.stop_deferred = True
            return True
        return False


HOLDING = Holding()
