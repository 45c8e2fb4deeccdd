"""``AsyncLimiter``'s breaker (queue_ratelimit._async_breaker): once a call has waited out
the timeout on a stopped Redis, calls fail at once (the fail mode decides) until a caller,
the first after each back-off window, finds Redis answering again.

Counts, never timings: of many concurrent acquires on a stopped server, how many waited out
the timeout (each call that did is one the breaker heard of, and its error says so) and how
many were refused before anything was sent.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from conftest import RedisProcess
from test_breaker import Clock, freeze, thaw

from queue_ratelimit import AsyncLimiter, BackendUnavailable, Decision, Limit
from queue_ratelimit._async_breaker import async_breaker_of
from queue_ratelimit._breaker import BreakerCore, refused

CALLERS = 8  # acquires in flight at once, each caller making its calls one after another
CALLS = 200  # acquires in all
# A window far longer than the test: no caller is let through as a probe, so every acquire
# but the first of each caller is refused, whatever the machine's speed.
NO_PROBE = (600.0, 600.0)


@pytest.fixture
def server(redis_process: Callable[..., RedisProcess]) -> Iterator[RedisProcess]:
    started = redis_process()
    try:
        yield started
    finally:
        thaw(started)  # (then the factory kills it)


async def ready(server: RedisProcess, **options: Any) -> AsyncLimiter:
    limiter = AsyncLimiter.from_url(server.url, namespace=f"ab{uuid.uuid4().hex[:8]}", **options)
    await limiter.set_limit("tenant:*", Limit(1000, burst=1000))
    return limiter


async def until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    """Wait for ``condition`` (a coroutine function) to return something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


# -- the state machine is the sync breaker's -------------------------------------------------
def test_the_async_pool_runs_the_shared_state_machine() -> None:
    limiter = AsyncLimiter.from_url("redis://127.0.0.1:1/0")
    breaker = async_breaker_of(limiter.client)
    assert type(breaker) is BreakerCore
    assert breaker.caller_probes
    unguarded = AsyncLimiter.from_url("redis://127.0.0.1:1/0", backoff=None)
    assert async_breaker_of(unguarded.client) is None
    assert async_breaker_of(redis.asyncio.Redis.from_url("redis://127.0.0.1:1/0")) is None


# -- a stopped server ----------------------------------------------------------------------------
@pytest.mark.parametrize("fail_mode", ["open", "closed", "raise"])
def test_of_many_concurrent_acquires_only_the_first_wave_waits(
    server: RedisProcess, fail_mode: Any
) -> None:
    """8 callers make 200 acquires on a stopped server: the first acquire of each (all in
    flight before any timed out) waits out the timeout, and the breaker refuses every other
    at once, nothing sent; the fail mode answers all 200 alike."""
    expected = {
        "open": Decision(allowed=True, degraded=True),
        "closed": Decision(allowed=False, wait_ms=1000.0, degraded=True),
        "raise": None,
    }[fail_mode]
    waited: list[BaseException] = []

    async def scenario() -> tuple[list[Decision | None], BreakerCore]:
        limiter = await ready(server, fail_mode=fail_mode, backoff=NO_PROBE)
        breaker = async_breaker_of(limiter.client)
        assert breaker is not None
        freeze(server)

        async def decide() -> Decision | None:
            try:
                return await limiter.acquire("acme")
            except BackendUnavailable as exc:
                if not refused(exc):
                    waited.append(exc)
                return None

        async def caller() -> list[Decision | None]:
            return [await decide() for _ in range(CALLS // CALLERS)]

        decided = await asyncio.gather(*(caller() for _ in range(CALLERS)))
        return [d for each in decided for d in each], breaker

    decisions, breaker = asyncio.run(scenario())
    assert len(decisions) == CALLS
    assert all(d == expected for d in decisions)
    # Every acquire either waited out the timeout (the breaker heard of it) or was refused.
    assert breaker.timeouts + breaker.refused == CALLS
    assert breaker.timeouts == CALLERS
    assert breaker.probes == 0
    if fail_mode == "raise":  # each error says which it was: RedisDown (not sent), or not
        assert len(waited) == CALLERS


def test_a_caller_after_the_window_probes_and_finds_redis_back(server: RedisProcess) -> None:
    """Once the server runs again, the first caller after the window is sent as the probe;
    its answer closes the breaker, and decisions are enforced again."""

    async def scenario() -> BreakerCore:
        limiter = await ready(server, fail_mode="open", backoff=(0.25, 1.0))
        breaker = async_breaker_of(limiter.client)
        assert breaker is not None
        freeze(server)
        assert (await limiter.acquire("acme")).degraded  # waited out the timeout
        assert breaker.down
        assert breaker.timeouts == 1
        thaw(server)

        async def enforced() -> bool:
            return not (await limiter.acquire("acme")).degraded

        await until(enforced, "a probe to find Redis back")
        assert not breaker.down
        await limiter.aclose()
        return breaker

    breaker = asyncio.run(scenario())
    assert breaker.probes >= 1


def test_a_probe_that_sends_nothing_frees_the_turn(server: RedisProcess) -> None:
    """A probing caller cancelled before its reply (or whose call never went out) gives
    its turn back: the next caller after the window probes, the breaker is never stuck."""

    async def scenario() -> None:
        limiter = await ready(server, fail_mode="open", backoff=(0.25, 1.0))
        breaker = async_breaker_of(limiter.client)
        assert breaker is not None
        clock = breaker._clock = Clock()
        freeze(server)
        assert (await limiter.acquire("acme")).degraded
        clock.now += 0.25  # the window is over: the next caller probes
        probe = asyncio.ensure_future(limiter.acquire("acme"))
        await until(lambda: _true(breaker.probes == 1), "the probe to be sent")
        assert (await limiter.acquire("acme")).degraded  # refused meanwhile
        refused_before = breaker.refused
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert breaker.down
        assert breaker.refused == refused_before
        thaw(server)
        assert not (await limiter.acquire("acme")).degraded  # the turn was free again
        assert not breaker.down
        assert breaker.probes == 2
        await limiter.aclose()

    asyncio.run(scenario())


async def _true(value: bool) -> bool:
    return value
