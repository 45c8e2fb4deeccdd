"""Fail modes (raise, open, closed) when Redis dies, and recovery when it comes back."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import pytest
import redis
from conftest import RedisProcess, wait_until
from redis.backoff import NoBackoff
from redis.retry import Retry

from queue_ratelimit import BackendUnavailable, Decision, Limit, Limiter, RateLimitError

HOUR = 3600.0


def enforced_decision(lim: Limiter) -> Decision | None:
    """A decision made by Redis (not by the fail mode), or None while it is not back yet."""
    try:
        decision = lim.acquire("acme")
    except BackendUnavailable:
        return None
    return None if decision.degraded else decision


@pytest.mark.parametrize("fail_mode", ["raise", "open", "closed"])
def test_fail_mode_and_recovery(
    redis_process: Callable[..., RedisProcess],
    caplog: pytest.LogCaptureFixture,
    fail_mode: str,
) -> None:
    server = redis_process()
    client = redis.Redis(
        port=server.port,
        socket_connect_timeout=0.5,
        socket_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    lim = Limiter(
        client,
        namespace=f"f{uuid.uuid4().hex[:8]}",
        fail_mode=fail_mode,  # type: ignore[arg-type]
        closed_retry_ms=750,
    )
    lim.set_limit("tenant:acme", Limit(1, per=HOUR, burst=1))
    assert lim.acquire("acme").allowed
    assert not lim.acquire("acme").allowed
    assert lim.backend_failures == 0

    server.stop()
    caplog.set_level(logging.WARNING, logger="queue_ratelimit")
    for _ in range(3):
        if fail_mode == "raise":
            with pytest.raises(BackendUnavailable, match="Redis unreachable") as info:
                lim.acquire("acme")
            assert isinstance(info.value, RateLimitError)
            assert isinstance(info.value.__cause__, redis.ConnectionError)
            continue
        decision = lim.acquire("acme")
        if fail_mode == "open":
            assert decision == Decision(allowed=True, degraded=True)
        else:
            assert decision == Decision(allowed=False, wait_ms=750, degraded=True)
            assert decision.retry_after == 0.75
    assert lim.backend_failures == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "the outage is logged once, not once per decision"
    assert "Redis unreachable" in errors[0].getMessage()
    assert fail_mode.upper() in errors[0].getMessage()

    server.start()  # same port, empty dataset, no scripts loaded
    decision = wait_until(lambda: enforced_decision(lim), timeout=15, what="Redis to return")
    assert isinstance(decision, Decision)
    assert decision.allowed  # the new server has no limits yet
    assert decision.remaining == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "reachable again" in warnings[0].getMessage()
    # Limits are enforced again, through freshly loaded scripts.
    assert lim.set_limit("tenant:acme", Limit(1, per=HOUR, burst=1)) == 1
    assert lim.acquire("acme").allowed
    denied = lim.acquire("acme")
    assert not denied.allowed
    assert not denied.degraded
    assert denied.denied_by == "tenant:acme"
    client.close()
