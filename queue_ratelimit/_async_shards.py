"""``AsyncLimiter(client, shards=N)``: the asyncio twin of ``ShardedLimiter``.

Every rule comes from ``_shard_layout.ShardLayout`` and the rebalance plan of ``_leases``
(``RoundClock``), which the sync limiter uses too; only the waiting differs. A decision
routes to its tenant's shard (``crc32(tenant) % N``) in one call, names its slot
"<shard>.<token>", and runs the rebalancer inline when it is due, as ``ShardedLimiter``'s
do; a configuration change is written at home, then to every shard.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import RedisError

from ._async_limiter import AsyncLimiter
from ._core import (
    DEFAULT_HOLD,
    Mode,
    ScriptCall,
    as_slot,
    check_hold,
    concurrency_scope,
    pause_scope,
    redis_errors,
)
from ._decision import Decision, Pause, Slot
from ._errors import CostExceedsBurst
from ._leases import RebalanceReport, RoundClock, shared_scope
from ._scopes import Scope
from ._shard_layout import (
    ShardLayout,
    shares_of,
)


class AsyncRebalancer(RoundClock):
    """``Rebalancer`` for an ``AsyncShardedLimiter``: the same round, awaited."""

    limiter: AsyncShardedLimiter

    def __init__(self, limiter: AsyncShardedLimiter, interval: float) -> None:
        super().__init__(limiter, interval)
        self._busy = False

    async def tick(self) -> None:
        """Rebalance if it is this process's turn; never raises."""
        if self._busy:  # (another task of this loop is running a round)
            return
        self._busy = True
        try:
            self.started()
            pipe = self.limiter.client.pipeline(transaction=False)
            self.queue_lock(pipe)
            if self.locked(await pipe.execute()):
                self.last = await self.run()
            self.failed(None)
        except Exception as exc:  # (a round is best effort: decisions must go on)
            self.failed(exc)
        finally:
            self._busy = False

    async def run(self) -> RebalanceReport:
        """One round now, lock or not (``AsyncShardedLimiter.rebalance``)."""
        started = time.perf_counter()
        lim = self.limiter
        with redis_errors():
            epoch = int(await lim.client.hincrby(lim.keys.share, "epoch", 1))
        for i in range(lim.shards):
            if await lim.write_shard(i, 0, str(epoch), "fence", []) < 0:
                return RebalanceReport(epoch, 0, {}, 0, 0, time.perf_counter() - started, True)
        with redis_errors():
            seconds, micros = await lim.client.time()
            pipe = lim.client.pipeline(transaction=False)
            self.queue_reads(pipe)
            replies = await pipe.execute()
        plan = self.plan(seconds * 1_000_000 + micros, replies)
        writes = 0
        for shard, mode, triples in plan.writes:
            if await lim.write_shard(shard, plan.version, str(epoch), mode, triples) < 0:
                return plan.report(epoch, writes, time.perf_counter() - started, True)
            writes += 1
        fenced = await lim.write_state(str(epoch), plan.state) < 0  # (as Rebalancer.run)
        return plan.report(epoch, writes, time.perf_counter() - started, fenced)


class AsyncShardedLimiter(ShardLayout, AsyncLimiter):
    """An ``AsyncLimiter`` over N shards; made by ``AsyncLimiter(client, shards=N)`` with
    N > 1. It differs from an unsharded one as ``ShardedLimiter`` does from ``Limiter``,
    and shares its keys: sync and asyncio processes may serve one sharded namespace."""

    rebalancer: AsyncRebalancer
    rebalancer_class = AsyncRebalancer

    # -- decisions ---------------------------------------------------------------------
    async def _decide(self, mode: Mode, tenant: str, *rest: Any) -> Decision:
        # (rest: queue, priority, cost and perhaps hold, as the limiter's own _decide)
        shard, call = self.route(mode, tenant, *rest)
        cost = rest[2]
        try:
            reply = await self._scripts.acall_packed("acquire.lua", call)
        except RedisError as exc:
            return self._core.decision_failed(exc)
        try:
            decision = self.in_shard(self._core.decision(reply, cost), shard)
        except CostExceedsBurst as exc:
            decision = await self._beyond_slice(shard, exc)
        if self._core.fail_mode_pending:
            await self.report_fail_mode()
        if time.monotonic() >= self.rebalancer.due:
            await self.rebalancer.tick()
        return decision

    async def _beyond_slice(self, shard: int, exc: CostExceedsBurst) -> Decision:
        if shared_scope(exc.scope) is None:
            raise exc
        with redis_errors():
            whole = await self.client.hget(self.keys.config, exc.scope)
        decision = self.slice_denial(exc, whole, self.rebalancer.interval * 1000)
        with redis_errors():
            await self.client.hincrby(self.shard_keys[shard].shared, f"d:{exc.scope}", 1)
        return decision

    # -- concurrency -------------------------------------------------------------------
    async def _slots(self, mode: Any, held: Decision | Slot | str, hold_ms: int) -> bool:
        found = as_slot(held)
        if found is None:
            return False
        shard, slot = self.shard_slot(found)
        call = self._cores[shard].slot_call(mode, slot, hold_ms)
        with redis_errors():
            return bool(await self._scripts.acall("slots.lua", call.keys, call.args) == 1)

    async def release(self, held: Decision | Slot | str) -> bool:
        return await self._slots("release", held, 0)

    async def extend_slot(self, held: Decision | Slot | str, hold: float = DEFAULT_HOLD) -> bool:
        return await self._slots("extend", held, check_hold(hold))

    async def running(self, scope: str | Scope) -> int:
        name = concurrency_scope(scope)
        with redis_errors():
            seconds, micros = await self.client.time()
            pipe = self.client.pipeline(transaction=False)
            for i in self.running_on(name):
                pipe.zcount(
                    self.shard_keys[i].slots(name), f"({seconds * 1_000_000 + micros}", "+inf"
                )
            return sum(int(n) for n in await pipe.execute())

    # -- configuration -----------------------------------------------------------------
    async def _run_config(self, call: ScriptCall, must_exist: bool = False) -> int:
        version = await super()._run_config(call, must_exist)
        if version <= 0:
            return version  # (nothing there, nothing changed)
        for i, triple in enumerate(self.config_triples(call, await self.shares())):
            await self.write_shard(i, version, "", "", triple)
        return version

    async def pause(self, scope: str | Scope, seconds: float, *, actor: str = "api") -> Pause:
        call = self._core.pause_call(scope, seconds, actor)
        reply = await self._pause_call(call)
        pause = self._core.pause_result(call, reply)
        await self._push(int(reply[0]), self.pause_triple(pause.scope, str(pause.until_ms)))
        return pause

    async def resume(self, scope: str | Scope, *, actor: str = "api") -> bool:
        reply = await self._pause_call(self._core.resume_call(scope, actor))
        if int(reply[0]) < 0:
            return False
        await self._push(int(reply[0]), self.pause_triple(pause_scope(scope), ""))
        return True

    async def _pause_call(self, call: ScriptCall) -> list[Any]:
        with redis_errors():
            pipe = self.client.pipeline(transaction=False)
            self.queue_pause_index_read(pipe)
            candidates = self.ran_out(*await pipe.execute())
            reply: list[Any] = await self._scripts.acall("config.lua", call.keys, call.args)
            if candidates:
                pipe = self.client.pipeline(transaction=False)
                self.queue_forgotten_read(pipe, candidates)
                version, triples = self.forgotten(candidates, *await pipe.execute())
                if triples:
                    await self._push(version, triples)
        return reply

    async def _push(self, version: int, triples: list[str]) -> None:
        for i in range(self.shards):
            await self.write_shard(i, version, "", "", triples)

    async def write_shard(
        self, shard: int, version: int, epoch: str, mode: str, triples: Sequence[str]
    ) -> int:
        """Write fields of one shard's configuration (lua/shards.lua)."""
        return await self._shards_lua(self.write_call(shard, version, epoch, mode, triples))

    async def write_state(self, epoch: str, state: Mapping[str, str]) -> int:
        """As ``ShardedLimiter.write_state``."""
        return await self._shards_lua(self.state_call(epoch, state))

    async def _shards_lua(self, call: tuple[list[str], list[object]]) -> int:
        with redis_errors():
            return int(await self._scripts.acall("shards.lua", *call))

    async def shares(self) -> dict[str, list[float]]:
        """As ``ShardedLimiter.shares``."""
        with redis_errors():
            return shares_of(await self.client.hgetall(self.keys.share), self.shards)

    async def rebalance(self) -> RebalanceReport:
        """As ``ShardedLimiter.rebalance``."""
        return await self.rebalancer.run()
