"""Per-process memory of a Redis that stopped answering, so that each call does not wait
out the client's timeout again.

A Redis that hangs (SIGSTOPped, a frozen VM) costs every call the whole timeout. A process
that makes many calls, above all a Celery consumer whose one thread feeds the whole worker,
then does next to nothing while the fail mode was meant to keep it going. So once a call has
waited out its timeout, the client's pool refuses connections at once (``RedisDown``, an
outage: the fail mode applies at once) for a back-off window, while one probe at a time asks
Redis whether it answers again: a thread of its own for the clients this package makes (no
caller ever waits for it), or, for a client someone else made (``guard_of``) and for the
asyncio clients (``_async_breaker``), the first caller after the window. Both run one state
machine, ``BreakerCore``, which does no I/O of its own.

Only a call that waited out the timeout counts: a refused or dropped connection fails at
once, so finding that out again costs nothing (and a restarted server is used again at once).
Nothing is sent while Redis is known down, so a refused call never ran.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# The fail mode's own lines (the limiter's, the gate's) say what an outage means for work;
# these say what the client does about it.
log = logging.getLogger("queue_ratelimit.redis")

# Seconds Redis is left alone after a call waited out its timeout, then after each probe
# that did too (doubled each time, up to the second figure).
DEFAULT_BACKOFF = (0.25, 5.0)
Backoff = tuple[float, float]


class RedisDown(RedisConnectionError):
    """Not sent: Redis did not answer a call within the timeout a moment ago, and has not
    answered a probe since. Nothing of the call reached Redis."""


def check_backoff(backoff: object) -> Backoff:
    """``backoff`` as (first, most) seconds; raises ValueError unless 0 < first <= most."""
    from ._errors import InvalidCost

    if (
        isinstance(backoff, str)
        or not isinstance(backoff, tuple | list)
        or len(backoff) != 2
        or not all(type(v) in (int, float) for v in backoff)
        or not 0 < backoff[0] <= backoff[1] <= 3600
    ):
        raise InvalidCost(
            f"backoff must be (first, most) seconds with 0 < first <= most <= 3600, got "
            f"{backoff!r:.100}"
        )
    return float(backoff[0]), float(backoff[1])


class BreakerCore:
    """The breaker's state machine, and nothing else: no lock, no thread, no socket (the
    caller serialises calls; ``Breaker`` adds a lock and a prober thread for threads, the
    asyncio pool of ``_async_breaker`` uses it as it is on its event loop).

    While Redis is known down, ``allow`` refuses every call; with ``caller_probes`` the
    first call after each back-off window is let through as the probe instead (one at a
    time), and how it went (``failed``, ``ok``, ``release``) decides the next window.

    Args:
        backoff: (first, most) seconds between probes; doubled after each unanswered one.
        name: the server, for the log.
        clock: seconds, monotonic (tests pass their own).
        caller_probes: whether callers are let through as probes (False: something else
            probes, and calls ``ok`` when Redis answers).
    """

    def __init__(
        self,
        backoff: Backoff = DEFAULT_BACKOFF,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
        caller_probes: bool = True,
    ) -> None:
        self.first, self.most = check_backoff(backoff)
        self.name = name
        self.caller_probes = caller_probes
        self._clock = clock
        # When the first call timed out (None: Redis answers, as far as we know).
        self.down_since: float | None = None
        self._backoff = self.first
        self._retry_at = 0.0
        self._probing = False  # a caller let through as the probe has not come back
        # Counts since the client was made (for tests and stats): calls refused at once,
        # calls that waited out the timeout, callers let through as probes.
        self.refused = 0
        self.timeouts = 0
        self.probes = 0

    @property
    def down(self) -> bool:
        """Whether Redis is known not to answer now."""
        return self.down_since is not None

    def allow(self) -> bool:
        """Whether a call may go to Redis now (False: refuse it at once)."""
        if self.down_since is None:  # the hot path
            return True
        if self.caller_probes and not self._probing and self._clock() >= self._retry_at:
            self._probing = True
            self.probes += 1
            return True
        self.refused += 1
        return False

    def failed(self) -> bool:
        """A call waited out its timeout: Redis is down for a while. True when this call
        found it out (the breaker was closed until now)."""
        now = self._clock()
        self.timeouts += 1
        opened = self.down_since is None
        if opened:
            self.down_since = now
            self._backoff = self.first
            log.warning(
                "queue-ratelimit: Redis%s did not answer within the timeout: calls fail "
                "at once (the fail mode decides) until it answers a probe again "
                "(every %gs to %gs)",
                f" at {self.name}" if self.name else "",
                self.first,
                self.most,
            )
        elif self._probing:  # the caller let through as the probe timed out too
            self._backoff = min(self._backoff * 2, self.most)
        self._probing = False
        self._retry_at = now + self._backoff
        return opened

    def ok(self) -> None:
        """Redis answered: calls go through again."""
        if self.down_since is None:
            return
        log.info(
            "queue-ratelimit: Redis%s answering again after %.1fs",
            f" at {self.name}" if self.name else "",
            self._clock() - self.down_since,
        )
        self.down_since = None
        self._probing = False
        self._backoff = self.first

    def missed(self) -> float:
        """A probe made by someone else went unanswered: the seconds until the next one
        (the window doubled, up to its bound)."""
        self._backoff = min(self._backoff * 2, self.most)
        self._retry_at = self._clock() + self._backoff
        return self._backoff

    def refusal(self) -> str:
        """Why a call is refused now."""
        since = self.down_since
        silent = 0.0 if since is None else self._clock() - since
        return (
            f"queue-ratelimit: not sent: Redis has not answered for {silent:.1f}s (a call "
            "waited out its timeout); calls fail at once until it answers a probe"
        )

    def release(self) -> None:
        """A caller let through as the probe made no call after all."""
        self._probing = False


class Breaker(BreakerCore):
    """``BreakerCore`` for threads: a lock around its steps, a fresh state in a forked
    child, and, given ``probe``, a thread of its own that probes (callers never pass while
    Redis is down).

    Args:
        backoff: (first, most) seconds between probes; doubled after each unanswered one.
        probe: asks Redis once (with the client's timeout): True when it answered anything.
            Given, a thread runs the probes and callers never pass while Redis is down;
            None, the first caller after each window is let through as the probe.
        name: the server, for the log.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        backoff: Backoff = DEFAULT_BACKOFF,
        probe: Callable[[], bool] | None = None,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(backoff, name, clock, caller_probes=probe is None)
        self._probe = probe
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    @property
    def down(self) -> bool:
        """Whether Redis is known not to answer now (in this process)."""
        if self.down_since is None:
            return False
        if os.getpid() != self._pid:
            self._forked()
            return False
        return True

    def allow(self) -> bool:
        if self.down_since is None:  # the hot path, without the lock
            return True
        if os.getpid() != self._pid:
            self._forked()
            return True
        with self._lock:
            return super().allow()

    def failed(self) -> bool:
        if os.getpid() != self._pid:
            self._forked()
        with self._lock:
            opened = super().failed()
            if opened and self._probe is not None:
                self._start_prober()
            return opened

    def ok(self) -> None:
        if self.down_since is None:
            return
        with self._lock:
            super().ok()
            self._wake.set()  # (a prober waiting for its next turn ends now)

    def close(self) -> None:
        """Stop probing (the client is closed): callers probe from now on."""
        self._probe = None
        self.caller_probes = True
        self._wake.set()

    # -- internals -------------------------------------------------------------------------
    def _forked(self) -> None:
        # A child of a process that knew Redis down (a prefork pool's new process): the
        # parent's prober is not here, so the child finds out for itself.
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.down_since = None
        self._probing = False
        self._thread = None
        self._wake = threading.Event()

    def _start_prober(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._run_probes, name="queue-ratelimit-redis-probe", daemon=True
        )
        self._thread.start()

    def _run_probes(self) -> None:
        wake = self._wake
        delay = self.first
        while self.down_since is not None and self._probe is not None:
            if wake.wait(delay):
                return  # answered meanwhile (a reply to a call sent before), or closed
            probe = self._probe
            if probe is None:
                return
            if probe():
                self.ok()
                return
            with self._lock:
                delay = self.missed()


class _Guarded:
    """Mixed into a redis-py connection class: a call that waits out its timeout (to
    connect, write or read) tells the breaker, once (a handshake's read that timed out
    fails the connect too)."""

    breaker: Breaker
    _heard = False  # the breaker was told of this connect's timeout already

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        self._heard = False
        try:
            return super().connect(*args, **kwargs)  # type: ignore[misc]
        except RedisTimeoutError:
            if not self._heard:
                self.breaker.failed()
            raise

    def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().send_packed_command(*args, **kwargs)  # type: ignore[misc]
        except RedisTimeoutError:
            self._heard = True
            self.breaker.failed()
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except RedisTimeoutError:
            self._heard = True
            self.breaker.failed()
            raise


class GuardedPool(redis.ConnectionPool):
    """A connection pool that refuses connections at once while its breaker says Redis is
    down (``RedisDown``). Made by ``guarded_client``."""

    breaker: Breaker

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if not self.breaker.allow():
            raise RedisDown(self.breaker.refusal())
        return super().get_connection(*args, **kwargs)


def _probe_of(base: type, kwargs: dict[str, Any]) -> Callable[[], bool]:
    """A PING on a connection of its own (a plain one: its outcome is the probe's)."""

    def probe() -> bool:
        conn = base(**kwargs)
        try:
            conn.connect()
            conn.send_command("PING")
            conn.read_response()
        except RedisTimeoutError:
            return False
        except (AuthenticationError, AuthorizationError, RedisError, OSError):
            return True  # an answer (or a refusal at once): nothing to wait for
        finally:
            with contextlib.suppress(Exception):  # a probe's connection, gone either way
                conn.disconnect()
        return True

    return probe


def _guard(pool: GuardedPool, backoff: Backoff) -> None:
    """Give ``pool`` a breaker of its own, and connections that tell it of timeouts."""
    base = pool.connection_class
    kwargs = dict(pool.connection_kwargs)
    where = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    # A probe is one attempt: its outcome is the answer, and the client's retry policy
    # would only delay it (and draw on the random module for its jitter, from a thread).
    kwargs["retry"] = None
    kwargs.pop("retry_on_error", None)
    kwargs.pop("retry_on_timeout", None)
    breaker = Breaker(backoff, probe=_probe_of(base, kwargs), name=str(where))
    pool.breaker = breaker
    # A client dropped while Redis is down leaves no prober behind (it holds the breaker,
    # not the pool).
    weakref.finalize(pool, breaker.close)
    pool.connection_class = type(f"Guarded{base.__name__}", (_Guarded, base), {"breaker": breaker})


def guarded_client(url: str, backoff: Backoff, **options: Any) -> redis.Redis:
    """``redis.Redis.from_url(url, **options)`` whose pool has a breaker (see the module)."""
    pool = GuardedPool.from_url(url, **options)
    _guard(pool, backoff)
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


def node_pool_class(backoff: Backoff) -> type[GuardedPool]:
    """A pool class for ``RedisCluster(connection_pool_class=...)``: each primary's pool gets
    a breaker of its own, so a primary that stops answering is an outage for the calls to
    its slots only (the others' go on)."""

    class NodePool(GuardedPool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _guard(self, backoff)

    return NodePool


def breaker_of(client: Any) -> Breaker | None:
    """The breaker of a client ``guarded_client`` made; None for any other."""
    pool = getattr(client, "connection_pool", None)
    return pool.breaker if isinstance(pool, GuardedPool) else None


# Breakers of clients made elsewhere (RQ's connection), kept as long as each client lives.
_foreign: weakref.WeakKeyDictionary[Any, Breaker] = weakref.WeakKeyDictionary()
_foreign_lock = threading.Lock()


def guard_of(client: Any) -> Breaker:
    """The breaker for calls on ``client``: its pool's if ``guarded_client`` made it; else
    one without a prober, kept with the client, for callers that ask ``allow`` first and
    ``report`` how the call went (while Redis is known down, one caller per back-off
    window is let through to find out, and the others skip the call)."""
    own = breaker_of(client)
    if own is not None:
        return own
    with _foreign_lock:
        try:
            found = _foreign.get(client)
            if found is None:
                found = _foreign[client] = Breaker()
        except TypeError:  # (not weakly referenceable: nothing to remember it by)
            found = Breaker()
        return found


def refused(exc: BaseException, *also: type[BaseException]) -> bool:
    """Whether a failed call was refused before anything was sent (``RedisDown``, or one
    of ``also``, raised or the cause of what was raised): nothing of it ran."""
    kinds: tuple[type[BaseException], ...] = (RedisDown, *also)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, kinds):
            return True
        cause = cause.__cause__
    return False


def report(breaker: Breaker, exc: BaseException | None) -> None:
    """Tell ``breaker`` how a call it allowed went: ``exc`` is what the call raised (ours
    or redis-py's), None when it returned."""
    redis_exc = exc
    while redis_exc is not None and not isinstance(redis_exc, RedisError):
        redis_exc = redis_exc.__cause__
    if exc is not None and redis_exc is None:
        breaker.release()  # not Redis's error (bad input, say): the call never went out
    elif isinstance(redis_exc, RedisTimeoutError):
        breaker.failed()
    elif not isinstance(redis_exc, RedisDown):
        breaker.ok()  # an answer, or an error at once: nothing to wait for
