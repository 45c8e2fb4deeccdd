"""``AsyncLimiter(client, shards=N)``: the asyncio twin of a sharded ``Limiter``, on the same
keys (tests/test_shards.py checks the layout itself; here the async one against it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis
from conftest import tenants_on

from queue_ratelimit import AsyncLimiter, ConfigError, CostExceedsBurst, Limit, Limiter
from queue_ratelimit._async_shards import AsyncShardedLimiter
from queue_ratelimit._leases import FLOOR
from queue_ratelimit._shards import ShardedLimiter

T = TypeVar("T")
HOUR = 3600.0


def run(
    url: str,
    namespace: str,
    body: Callable[[AsyncShardedLimiter], Awaitable[T]],
    interval: float = 3600,
) -> T:
    async def main() -> T:
        lim = AsyncLimiter.from_url(url, namespace=namespace, shards=3, rebalance_interval=interval)
        assert isinstance(lim, AsyncShardedLimiter)
        async with lim:
            return await body(lim)

    return asyncio.run(main())


def test_shards_are_taken_and_checked_as_by_limiter(redis_client: redis.Redis) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis()
    assert type(AsyncLimiter(client)) is AsyncLimiter
    assert type(AsyncLimiter(client, shards=1)) is AsyncLimiter
    with pytest.raises(ConfigError, match="shards"):
        AsyncLimiter(client, shards=0)
    with pytest.raises(ConfigError, match="shards"):
        AsyncLimiter(client, shards=True)  # type: ignore[arg-type]
    lim = AsyncLimiter(client, namespace="ns", shards=5)
    sync = Limiter(redis_client, namespace="ns", shards=5)
    assert isinstance(lim, AsyncShardedLimiter)
    assert isinstance(sync, ShardedLimiter)
    assert lim.shard_keys == sync.shard_keys  # (ShardedLimiter's: one layout)
    assert lim.shard_of("acme") == sync.shard_of("acme")


def test_decisions_route_to_the_tenants_shard_and_share_its_buckets(
    sharded: ShardedLimiter, redis_client: redis.Redis, redis_url: str, namespace: str
) -> None:
    sharded.set_limit("tenant:*", Limit(1, per=HOUR, burst=2))
    tenants = [t for s in range(3) for t in tenants_on(sharded, s)]

    async def body(lim: AsyncShardedLimiter) -> list[bool]:
        return [(await lim.acquire(t)).allowed for t in tenants]

    assert run(redis_url, namespace, body) == [True] * 3
    for shard, tenant in enumerate(tenants):
        assert redis_client.exists(sharded.shard_keys[shard].tenant(tenant))
        assert not redis_client.exists(sharded.keys.tenant(tenant))
        assert sharded.acquire(tenant).allowed  # the second token of the burst
        assert sharded.acquire(tenant).denied_by == f"tenant:{tenant}"


def test_configuration_reaches_every_shard_and_is_read_at_home(
    sharded: ShardedLimiter, redis_client: redis.Redis, redis_url: str, namespace: str
) -> None:
    async def body(lim: AsyncShardedLimiter) -> tuple[int, int, Limit, dict[str, int]]:
        v1 = await lim.set_limit("global", Limit(30, per=1, burst=60))
        v2 = await lim.set_concurrency("queue:q", 10)
        got = (await lim.get_limit("global")).limit
        return v1, v2, got, await lim.concurrency()

    assert run(redis_url, namespace, body) == (1, 2, Limit(30, per=1, burst=60), {"queue:q": 10})
    for keys in sharded.shard_keys:
        assert redis_client.hget(keys.config, "global") == b"10.0 1.0 20.0 -"
    caps = [redis_client.hget(k.config, "conc:queue:q") for k in sharded.shard_keys]
    assert sum(int(c) for c in caps if isinstance(c, bytes)) == 10

    async def delete(lim: AsyncShardedLimiter) -> int:
        return await lim.delete_limit("global")

    assert run(redis_url, namespace, delete) == 3
    assert all(redis_client.hget(k.config, "global") is None for k in sharded.shard_keys)


def test_slots_name_their_shard_and_release_there(
    sharded: ShardedLimiter, redis_url: str, namespace: str
) -> None:
    sharded.set_concurrency("tenant:*", 1)
    sharded.set_concurrency("global", 30)
    tenants = [t for s in range(3) for t in tenants_on(sharded, s)]

    async def body(lim: AsyncShardedLimiter) -> list[str]:
        held = []
        for shard, tenant in enumerate(tenants):
            decision = await lim.acquire(tenant)
            assert decision.slot is not None
            assert decision.slot.token.startswith(f"{shard}.")
            assert await lim.running(f"tenant:{tenant}") == 1
            assert not (await lim.acquire(tenant)).allowed
            assert await lim.extend_slot(decision, 30)
            held.append(str(decision.slot))
        assert await lim.running("global") == 3
        assert await lim.release(held[0])
        assert not await lim.release(held[0])
        return held

    held = run(redis_url, namespace, body)
    # The sync limiter reads the same slot names.
    assert not sharded.release(held[0])
    assert sharded.release(held[1])
    assert sharded.running("global") == 1


def test_a_cost_above_the_slice_but_within_the_burst_is_denied_not_refused(
    sharded: ShardedLimiter, redis_client: redis.Redis, redis_url: str, namespace: str
) -> None:
    sharded.set_limit("global", Limit(30, per=1, burst=30))
    (tenant,) = tenants_on(sharded, 2)

    async def body(lim: AsyncShardedLimiter) -> None:
        decision = await lim.acquire(tenant, cost=20)
        assert not decision.allowed
        assert decision.denied_by == "global"
        with pytest.raises(CostExceedsBurst) as info:
            await lim.acquire(tenant, cost=31)
        assert info.value.burst == 30

    run(redis_url, namespace, body)
    assert redis_client.hget(sharded.shard_keys[2].shared, "d:global") == b"1"


def test_a_rebalance_moves_the_slice_to_the_denied_shard(
    sharded: ShardedLimiter, redis_url: str, namespace: str
) -> None:
    sharded.set_limit("global", Limit(30, per=HOUR, burst=30))
    (tenant,) = tenants_on(sharded, 1)

    async def body(lim: AsyncShardedLimiter) -> tuple[float, ...]:
        await lim.rebalance()  # (the first round only notes the counters)
        while (await lim.acquire(tenant)).allowed:
            pass
        report = await lim.rebalance()
        assert report.writes == 3
        assert not report.fenced
        shares = list(report.shares["global"])
        assert (await lim.shares())["global"] == pytest.approx(shares, abs=1e-5)
        return report.shares["global"]

    shares = run(redis_url, namespace, body)
    assert shares[1] == pytest.approx(1 - 2 * FLOOR / 3, abs=1e-3)
    assert sharded.shares()["global"] == pytest.approx(list(shares), abs=1e-5)


def test_an_older_async_rounds_state_is_refused_after_a_newer_round(
    sharded: ShardedLimiter, redis_url: str, namespace: str, redis_client: redis.Redis
) -> None:
    """As tests/test_shards.py's: a sync process's round runs whole between this round's
    plan and its state write, which is then refused."""
    sharded.set_limit("global", Limit(30, per=HOUR, burst=30))
    newer: dict[bytes, bytes] = {}

    async def body(lim: AsyncShardedLimiter) -> bool:
        plan = lim.rebalancer.plan

        def plan_then_a_newer_round(now_us: int, replies: list[object]) -> Any:
            planned = plan(now_us, replies)
            assert not sharded.rebalance().fenced
            newer.update(redis_client.hgetall(sharded.keys.share))
            return planned

        lim.rebalancer.plan = plan_then_a_newer_round  # type: ignore[method-assign]
        return (await lim.rebalance()).fenced

    assert run(redis_url, namespace, body)
    assert redis_client.hgetall(sharded.keys.share) == newer


def test_decisions_run_the_rebalancer_when_due(
    sharded: ShardedLimiter, redis_url: str, namespace: str
) -> None:
    """Piggy-backed on decisions, as the sync limiter's: an interval after the limiter was
    made, the next decision takes the lock and runs a round."""
    sharded.set_limit("global", Limit(300, per=HOUR, burst=300))
    (tenant,) = tenants_on(sharded, 0)

    async def body(lim: AsyncShardedLimiter) -> bool:
        assert lim.rebalancer.last is None
        deadline = asyncio.get_running_loop().time() + 10
        while lim.rebalancer.last is None and asyncio.get_running_loop().time() < deadline:
            assert (await lim.acquire(tenant)).allowed
            await asyncio.sleep(0.01)  # (pacing the loop, not a synchronisation)
        return lim.rebalancer.last is not None

    assert run(redis_url, namespace, body, interval=0.05)
    assert sharded.client.hget(sharded.keys.share, "seen") is not None


def test_pauses_reach_every_shard_and_so_does_their_end(
    sharded: ShardedLimiter, redis_client: redis.Redis, redis_url: str, namespace: str
) -> None:
    tenants = [t for s in range(3) for t in tenants_on(sharded, s)]

    async def body(lim: AsyncShardedLimiter) -> None:
        pause = await lim.pause("queue:q", 60)
        for tenant in tenants:
            decision = await lim.acquire(tenant, queue="q")
            assert decision.paused
        for keys in lim.shard_keys:
            assert redis_client.hget(keys.config, "pause:queue:q") == str(pause.until_ms).encode()
        assert await lim.resume("queue:q")
        assert not await lim.resume("queue:q")
        for tenant in tenants:
            assert (await lim.acquire(tenant, queue="q")).allowed

    run(redis_url, namespace, body)
    assert all(redis_client.hget(k.config, "pause:queue:q") is None for k in sharded.shard_keys)


def test_a_preview_replays_every_shards_recorded_traffic(
    sharded: ShardedLimiter, redis_url: str, namespace: str
) -> None:
    sharded.set_recording(600)
    tenants = [t for s in range(3) for t in tenants_on(sharded, s)]

    async def body(lim: AsyncShardedLimiter) -> tuple[float, float]:
        for tenant in tenants:
            for _ in range(5):
                assert (await lim.acquire(tenant, queue="q")).allowed
        preview = await lim.preview("global", Limit(1, per=HOUR, burst=3))
        return preview.work, preview.delayed

    work, delayed = run(redis_url, namespace, body)
    assert work == 15
    # Traffic is recorded by the second: 12 of the 15 wait, less what 1/h refills between
    # the seconds the 15 fell in (a 1/3600 per second straddled, so never exactly 12 then).
    assert 12 - 60 / 3600 <= delayed <= 12
