"""``AsyncLimiter`` shares ``Limiter``'s Redis state, errors and recovery. (It decides as
``Limiter`` does: the decision table of test_decisions.py runs on both.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from conftest import free_port
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ConstantBackoff, NoBackoff
from redis.retry import Retry

from queue_ratelimit import (
    AsyncLimiter,
    BackendUnavailable,
    CostExceedsBurst,
    Decision,
    InvalidCost,
    InvalidName,
    InvalidScope,
    Limit,
    Limiter,
    LimitNotFound,
    ScopeLimit,
)

T = TypeVar("T")
HOUR = 3600.0


def run(url: str, namespace: str, body: Callable[[AsyncLimiter], Awaitable[T]]) -> T:
    """Run ``body`` with an ``AsyncLimiter`` on a fresh event loop, closing it afterwards."""

    async def main() -> T:
        async with AsyncLimiter.from_url(url, namespace=namespace) as lim:
            return await body(lim)

    return asyncio.run(main())


def test_async_limiter_shares_state_with_sync(limiter: Limiter, redis_url: str) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2))

    async def body(lim: AsyncLimiter) -> tuple[Decision, Decision, ScopeLimit]:
        first = await lim.acquire("acme")
        second = await lim.acquire("acme")
        await lim.set_limit("global", "5/s")
        return first, second, await lim.get_limit("tenant:acme")

    first, second, got = run(redis_url, limiter.namespace, body)
    assert first.allowed
    assert second.allowed
    assert got.limit == Limit(1, per=HOUR, burst=2)
    assert not limiter.acquire("acme").allowed
    assert limiter.get_limit("global").limit == Limit(5)
    assert limiter.config_version() == 2


def test_async_errors_match_sync(limiter: Limiter, redis_url: str) -> None:
    limiter.set_limit("tenant:acme", Limit(1, burst=2))

    async def body(lim: AsyncLimiter) -> list[type[Exception]]:
        raised = []
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: lim.acquire("a:b"),
            lambda: lim.peek("acme", priority="URGENT"),
            lambda: lim.refund("acme", cost=0),
            lambda: lim.acquire("acme", cost=3),
            lambda: lim.set_limit("users", "1/s"),
            lambda: lim.get_limit("tenant:ghost"),
            lambda: lim.delete_limit("tenant:ghost"),
        ]
        for call in calls:
            try:
                await call()
            except Exception as exc:
                raised.append(type(exc))
        return raised

    assert run(redis_url, limiter.namespace, body) == [
        InvalidName,
        InvalidName,
        InvalidCost,
        CostExceedsBurst,
        InvalidScope,
        LimitNotFound,
        LimitNotFound,
    ]


@pytest.mark.parametrize("transport", ["fcall", "evalsha"])
def test_async_recovers_lost_scripts(limiter: Limiter, redis_url: str, transport: str) -> None:
    """After FUNCTION FLUSH (Functions) or SCRIPT FLUSH (scripts), as the sync limiter."""
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2))

    async def body(lim: AsyncLimiter) -> list[bool]:
        lim._scripts.transport = transport  # type: ignore[assignment]

        async def flush() -> None:
            if transport == "fcall":
                await lim.client.function_flush()
            else:
                await lim.client.script_flush()

        out = [(await lim.acquire("acme")).allowed]
        await flush()
        out.append((await lim.acquire("acme")).allowed)
        await flush()
        out.append((await lim.acquire("acme")).allowed)
        assert lim._scripts.transport == transport
        return out

    assert run(redis_url, limiter.namespace, body) == [True, True, False]


@pytest.mark.parametrize(
    ("fail_mode", "expected"),
    [("open", (True, True)), ("closed", (False, True)), ("raise", None)],
)
def test_async_fail_modes(fail_mode: str, expected: tuple[bool, bool] | None) -> None:
    port = free_port()  # nothing listens there

    async def main() -> tuple[bool, bool, float]:
        client = aioredis.Redis(port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
        async with AsyncLimiter(
            client, namespace=f"a{uuid.uuid4().hex[:8]}", fail_mode=fail_mode, closed_retry_ms=250
        ) as lim:  # type: ignore[arg-type]
            decision = await lim.acquire("acme")
            return decision.allowed, decision.degraded, decision.wait_ms

    if expected is None:
        with pytest.raises(BackendUnavailable) as info:
            asyncio.run(main())
        assert isinstance(info.value.__cause__, redis.ConnectionError)
        return
    allowed, degraded, wait_ms = asyncio.run(main())
    assert (allowed, degraded) == expected
    assert wait_ms == (0 if allowed else 250)


def test_async_recording_and_preview_match_the_sync_limiter(
    redis_url: str, namespace: str, limiter: Limiter
) -> None:
    async def body(lim: AsyncLimiter) -> tuple[float | None, float, float]:
        await lim.set_limit("tenant:*", "1000/s")
        await lim.set_recording(120)
        for _ in range(12):
            await lim.acquire("acme")
        preview = await lim.preview("tenant:*", Limit(2, burst=2))
        return await lim.recording(), preview.work, preview.delayed

    recording, work, delayed = run(redis_url, namespace, body)
    assert (recording, work) == (120.0, 12)
    assert limiter.preview("tenant:*", Limit(2, burst=2)).delayed == delayed
    assert 8 <= delayed <= 10


def test_async_decisions_survive_cancellation_and_timeouts(
    redis_url: str, namespace: str, limiter: Limiter, redis_client: redis.Redis
) -> None:
    """A decision cancelled while Redis holds its reply back (writes paused) leaves no
    half-read connection behind and consumes nothing; one that timed out on a dropped
    connection is sent again under the client's retry policy, and counted once."""

    async def body(lim: AsyncLimiter) -> list[bool]:
        await lim.set_limit("tenant:acme", Limit(1, per=HOUR, burst=10))
        outcomes = [(await lim.acquire("acme")).allowed]
        redis_client.client_pause(1000, all=False)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lim.acquire("acme"), timeout=0.2)
        outcomes.append((await lim.acquire("acme")).allowed)  # answered after the pause
        patient = AsyncLimiter(
            aioredis.Redis.from_url(
                redis_url,
                socket_timeout=0.3,
                retry=AsyncRetry(ConstantBackoff(0.1), 20),
                retry_on_error=[redis.TimeoutError],
            ),
            namespace=namespace,
        )
        outcomes.append((await patient.acquire("acme")).allowed)
        redis_client.client_pause(700, all=False)
        outcomes.append((await patient.acquire("acme")).allowed)  # timed out, sent again
        await patient.aclose()
        return outcomes

    assert run(redis_url, namespace, body) == [True, True, True, True]
    assert limiter.peek("acme").remaining == {"tenant:acme": pytest.approx(6, abs=0.01)}
