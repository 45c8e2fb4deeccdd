"""The client's breaker (queue_ratelimit._breaker): once a call has waited out the timeout,
calls fail at once until Redis answers a probe; and wrong credentials, which are no outage.

Counts, never timings: how many calls the breaker refused (none of them waited), how many
were let through as probes.
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from conftest import RedisProcess, wait_until

from queue_ratelimit import (
    BackendError,
    BackendUnavailable,
    Decision,
    FairScheduler,
    Limit,
    Limiter,
)
from queue_ratelimit._breaker import (
    Breaker,
    BreakerCore,
    RedisDown,
    breaker_of,
    guard_of,
    report,
)
from queue_ratelimit._errors import InvalidCost

PASSWORD = "s3cret-pass"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the breaker alone (a caller is the probe) ---------------------------------------------------
@pytest.mark.parametrize("make", [Breaker, BreakerCore], ids=["threads", "core"])
def test_one_caller_per_window_probes_and_the_window_doubles_up_to_its_bound(
    make: type[BreakerCore],
) -> None:
    """The state machine (``BreakerCore``, the asyncio pool's as it is) and the threads'
    breaker built on it behave alike."""
    clock = Clock()
    breaker = make((0.25, 1.0), clock=clock)
    assert breaker.allow()
    assert not breaker.down
    breaker.failed()  # a call waited out its timeout
    assert breaker.down
    assert [breaker.allow() for _ in range(5)] == [False] * 5
    windows, refused = [], 5
    for _ in range(5):
        start = clock.now
        while not breaker.allow():  # the first caller after the window is let through
            refused += 1
            clock.now += 0.125
        windows.append(clock.now - start)
        assert not breaker.allow()  # one probe at a time
        refused += 1
        breaker.failed()  # the probe timed out too
    assert windows == [0.25, 0.5, 1.0, 1.0, 1.0]
    clock.now += 1.0
    assert breaker.allow()
    breaker.ok()  # it answered
    assert not breaker.down
    assert all(breaker.allow() for _ in range(3))
    assert breaker.refused == refused


def test_report_reads_what_a_call_raised() -> None:
    breaker = Breaker(clock=Clock())
    timeout = redis.TimeoutError("Timeout reading from socket")
    try:
        raise BackendUnavailable("Redis unreachable") from timeout
    except BackendUnavailable as exc:
        report(breaker, exc)  # our error, caused by a timeout
    assert breaker.down
    breaker._retry_at = 0.0
    assert breaker.allow()
    report(breaker, InvalidCost("bad cost"))  # never went out: no verdict on Redis
    assert breaker.down
    assert breaker.allow()
    report(breaker, redis.ResponseError("WRONGTYPE"))  # an answer
    assert not breaker.down


@pytest.mark.parametrize("bad", [(0, 1), (2, 1), (1,), "1,2", (1, float("nan")), None, (1, 4000)])
def test_a_malformed_backoff_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidCost, match="backoff"):
        Limiter.from_url("redis://127.0.0.1:1/0", backoff=bad if bad is not None else ())


def test_a_client_made_elsewhere_gets_a_breaker_kept_with_it() -> None:
    own = redis.Redis.from_url("redis://127.0.0.1:1/0")
    assert breaker_of(own) is None
    assert guard_of(own) is guard_of(own)
    ours = Limiter.from_url("redis://127.0.0.1:1/0").client
    assert guard_of(ours) is breaker_of(ours) is not None
    assert breaker_of(Limiter.from_url("redis://127.0.0.1:1/0", backoff=None).client) is None


# -- a stopped server ----------------------------------------------------------------------------
@pytest.fixture
def stopped_later(redis_process: Callable[..., RedisProcess]) -> Iterator[RedisProcess]:
    server = redis_process()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)


def freeze(server: RedisProcess) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)


def thaw(server: RedisProcess) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("fail_mode", ["open", "closed", "raise"])
def test_after_one_timeout_the_fail_mode_applies_without_waiting(
    stopped_later: RedisProcess, fail_mode: Any
) -> None:
    """Only the first call waits out the timeout: the next 200 are refused by the breaker
    (none reached the socket), and the fail mode decides each; once the server answers
    again the probe closes the breaker and decisions are enforced again."""
    limiter = Limiter.from_url(stopped_later.url, namespace=f"b{uuid.uuid4().hex[:8]}")
    limiter._core.fail_mode = fail_mode
    limiter.set_limit("tenant:*", Limit(1000, burst=1000))
    breaker = breaker_of(limiter.client)
    assert breaker is not None
    freeze(stopped_later)

    def decide() -> Decision | None:
        try:
            return limiter.acquire("acme")
        except BackendUnavailable:
            return None

    first = decide()
    decisions = [decide() for _ in range(200)]
    assert breaker.refused == 200
    expected = {
        "open": Decision(allowed=True, degraded=True),
        "closed": Decision(allowed=False, wait_ms=1000.0, degraded=True),
        "raise": None,
    }[fail_mode]
    assert first == expected
    assert all(d == expected for d in decisions)
    with pytest.raises(BackendUnavailable, match="not sent"):
        FairScheduler(limiter).gate("acme", "j1")
    thaw(stopped_later)
    wait_until(lambda: not breaker.down, timeout=30, what="the probe to find Redis back")
    assert not limiter.acquire("acme").degraded


# -- wrong credentials are configuration, not an outage ----------------------------------------
@pytest.fixture
def guarded(redis_process: Callable[..., RedisProcess]) -> RedisProcess:
    """A server that wants a password (set after the start: the start's probe has none)."""
    server = redis_process()
    admin = redis.Redis.from_url(server.url)
    admin.config_set("requirepass", PASSWORD)
    admin.close()
    return server


def url_with(server: RedisProcess, password: str | None) -> str:
    auth = f":{password}@" if password is not None else ""
    return f"redis://{auth}127.0.0.1:{server.port}/0"


@pytest.mark.parametrize("fail_mode", ["open", "closed", "raise"])
@pytest.mark.parametrize("password", ["wrong", None], ids=["WRONGPASS", "NOAUTH"])
def test_refused_credentials_raise_a_backend_error_in_every_fail_mode(
    guarded: RedisProcess,
    fail_mode: Any,
    password: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong password (or none) is never taken for an outage: failing open on it would
    let every job through for as long as nobody fixes the URL. Every decision raises
    BackendError, said loudly, and nothing counts as a fail-mode decision."""
    limiter = Limiter.from_url(url_with(guarded, password), fail_mode=fail_mode)
    with caplog.at_level(logging.ERROR, logger="queue_ratelimit"):
        for _ in range(3):
            with pytest.raises(BackendError, match="refused the credentials"):
                limiter.acquire("acme")
    assert limiter.backend_failures == 0
    assert limiter._core.fail_mode_pending == {}
    loud = [r for r in caplog.records if "refused the credentials" in r.getMessage()]
    assert len(loud) == 1  # once, not once per call
    # The right password works.
    right = Limiter.from_url(url_with(guarded, PASSWORD), fail_mode=fail_mode)
    assert right.acquire("acme").allowed


def test_the_celery_gate_holds_work_on_refused_credentials(
    guarded: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """The gate's health sees the scheduler's BackendError as broken, not out: it holds
    every task (fail open or not) and logs why."""
    pytest.importorskip("celery")
    from queue_ratelimit.celery._health import RedisHealth

    scheduler = FairScheduler(Limiter.from_url(url_with(guarded, "wrong")))
    health = RedisHealth("open")
    with pytest.raises(BackendError) as caught:
        scheduler.gate("acme", "j1")
    with caplog.at_level(logging.ERROR, logger="queue_ratelimit.celery"):
        health.failed(caught.value, 0.0)  # as the gate does with what it caught
    assert health.broken
    [line] = [r.getMessage() for r in caplog.records]
    assert "refused the credentials" in line
    assert "holds every task" in line
    assert "fails OPEN" not in line


def test_refusal_is_a_connection_error_nothing_sent() -> None:
    assert issubclass(RedisDown, redis.ConnectionError)


# -- the prober ------------------------------------------------------------------------------
class _CountedConnection(redis.Connection):
    """A connection whose every connect attempt is refused, and counted."""

    attempts = 0

    def _connect(self) -> Any:
        type(self).attempts += 1
        raise redis.ConnectionError("refused (test)")


def test_a_probe_is_one_attempt_whatever_the_clients_retry_policy() -> None:
    """The probe's connection leaves out the client's retries: one refusal is the answer
    (with them, a probe of a hung server took the retries' timeouts and pauses, and drew
    on the random module for their jitter from the prober's thread)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from queue_ratelimit._breaker import GuardedPool, _guard

    pool = GuardedPool(
        connection_class=_CountedConnection,
        retry=Retry(NoBackoff(), 3),
        retry_on_error=[redis.ConnectionError],
    )
    _guard(pool, (0.25, 5.0))
    probe = pool.breaker._probe
    assert probe is not None
    _CountedConnection.attempts = 0
    assert probe() is True  # (refused at once: an answer)
    assert _CountedConnection.attempts == 1


def test_a_dropped_client_leaves_no_prober_behind() -> None:
    """The breaker outlives its client only as long as a prober thread holds it: dropping
    the client closes the breaker, so a prober that is running ends at its next turn."""
    import gc

    from queue_ratelimit._breaker import guarded_client

    client = guarded_client("redis://127.0.0.1:9/0", (0.25, 5.0))
    breaker = breaker_of(client)
    assert breaker is not None
    assert breaker._probe is not None
    del client
    gc.collect()
    assert breaker._probe is None
    assert breaker.caller_probes
