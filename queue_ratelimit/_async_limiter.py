"""``AsyncLimiter``: the asyncio twin of ``Limiter`` for async producers (redis.asyncio).

It shares every rule with ``Limiter`` through ``LimiterCore``; only the waiting differs.
"""

from __future__ import annotations

from typing import Any, Literal

from redis.exceptions import RedisError

from ._breaker import DEFAULT_BACKOFF
from ._client import REDIS_TIMEOUT, async_redis_client
from ._concurrency import CONCURRENCY_PREFIX
from ._config import ConfigSpec, parse_config, seed_calls
from ._core import (
    DEFAULT_HOLD,
    AuditEntry,
    ExemptMode,
    LimiterBase,
    LimitSpec,
    Mode,
    ScriptCall,
    as_slot,
    check_hold,
    concurrency_scope,
    redis_errors,
)
from ._decision import Decision, Pause, ScopeLimit, Slot
from ._durability import EvictionStatus, aeviction_status, judge_eviction
from ._errors import LimitNotFound
from ._preview import RECORD_FIELD, Preview, preview_read, preview_reads, recording_call
from ._scopes import Scope, scope_name
from ._shard_count import judge_shards, queue_shard_record
from ._urls import check_redis_url


class AsyncLimiter(LimiterBase):
    """Like ``Limiter``, with coroutine methods; see ``Limiter`` for each one.

    >>> limiter = AsyncLimiter.from_url("redis://localhost:6379/0")
    >>> decision = await limiter.acquire("acme", queue="emails")   # doctest: +SKIP

    ``shards=N`` (N > 1) spreads the namespace over N hash slots as ``Limiter`` does, with
    the same keys: ``AsyncLimiter(client, shards=N)`` makes an ``AsyncShardedLimiter``
    (docs/design.md, "Shards"); ``rebalance_interval`` as for ``Limiter``.
    """

    @classmethod
    def _sharded(cls) -> type[Any]:
        from ._async_shards import AsyncShardedLimiter  # (here: it subclasses this)

        return AsyncShardedLimiter

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float | None = REDIS_TIMEOUT,
        backoff: tuple[float, float] | None = DEFAULT_BACKOFF,
        **options: Any,
    ) -> AsyncLimiter:
        """As ``Limiter.from_url``: every wait on the server is bounded by ``timeout``, and
        once a call has waited it out the next ones fail at once (the fail mode decides)
        until Redis answers again. No thread probes: the first call after each back-off
        window (``backoff``, as ``Limiter.from_url``'s) is sent as the probe, and may wait
        out the timeout; the calls meanwhile are refused without a wait."""
        return cls(async_redis_client(check_redis_url(url), timeout, backoff), **options)

    async def eviction_status(self) -> EvictionStatus:
        return await aeviction_status(self.client)

    async def _eviction_check(self) -> None:
        judge_eviction(await self.eviction_status(), self.eviction)

    async def _shard_check(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        queue_shard_record(pipe, self.keys, self.shards)
        judge_shards(self.keys, self.shards, (await pipe.execute())[1])

    # -- decisions ---------------------------------------------------------------------
    async def acquire(
        self,
        tenant: str,
        queue: str | None = None,
        priority: str | None = None,
        cost: float = 1,
        *,
        hold: float | None = None,
    ) -> Decision:
        return await self._decide("acquire", tenant, queue, priority, cost, hold)

    async def peek(
        self, tenant: str, queue: str | None = None, priority: str | None = None, cost: float = 1
    ) -> Decision:
        return await self._decide("peek", tenant, queue, priority, cost)

    async def refund(
        self, tenant: str, queue: str | None = None, priority: str | None = None, cost: float = 1
    ) -> Decision:
        return await self._decide("refund", tenant, queue, priority, cost)

    async def _decide(
        self,
        mode: Mode,
        tenant: str,
        queue: str | None,
        priority: str | None,
        cost: float,
        hold: float | None = None,
    ) -> Decision:
        call = self._core.decision_call(mode, tenant, queue, priority, cost, hold)
        try:
            reply = await self._scripts.acall_packed("acquire.lua", call)
        except RedisError as exc:
            return self._core.decision_failed(exc)
        decision = self._core.decision(reply, cost)
        if self._core.fail_mode_pending:  # Redis is back after an outage
            await self.report_fail_mode()
        return decision

    async def report_fail_mode(self) -> None:
        """As ``Limiter.report_fail_mode``."""
        pipe = self.client.pipeline(transaction=False)
        counts = self._core.queue_fail_mode_counts(pipe)
        try:
            await pipe.execute()
        except RedisError:  # still away: kept for the next time
            self._core.fail_mode_unsent(counts)

    # -- concurrency -------------------------------------------------------------------
    async def release(self, held: Decision | Slot | str) -> bool:
        slot = as_slot(held)
        if slot is None:
            return False
        call = self._core.slot_call("release", slot, 0)
        with redis_errors():
            return bool(await self._scripts.acall("slots.lua", call.keys, call.args) == 1)

    async def extend_slot(self, held: Decision | Slot | str, hold: float = DEFAULT_HOLD) -> bool:
        slot = as_slot(held)
        if slot is None:
            return False
        call = self._core.slot_call("extend", slot, check_hold(hold))
        with redis_errors():
            return bool(await self._scripts.acall("slots.lua", call.keys, call.args) == 1)

    async def set_concurrency(
        self, scope: str | Scope, n: int | None, *, actor: str = "api"
    ) -> int:
        call = self._core.set_concurrency_call(scope, n, actor)
        return await self._run_config(call, must_exist=n is None)

    async def get_concurrency(self, scope: str | Scope) -> int | None:
        name = scope_name(scope)
        with redis_errors():
            value = await self.client.hget(self._core.keys.config, CONCURRENCY_PREFIX + name)
        return None if value is None else int(value)

    async def concurrency(self) -> dict[str, int]:
        return self._core.concurrency(await self._config_hash())

    async def running(self, scope: str | Scope) -> int:
        key = self._core.keys.slots(concurrency_scope(scope))
        with redis_errors():
            seconds, micros = await self.client.time()
            return int(await self.client.zcount(key, f"({seconds * 1_000_000 + micros}", "+inf"))

    # -- configuration -----------------------------------------------------------------
    async def _run_config(self, call: ScriptCall, must_exist: bool = False) -> int:
        with redis_errors():
            reply = await self._scripts.acall("config.lua", call.keys, call.args)
        return self._core.config_version(reply, str(call.args[1]), must_exist)

    async def _config_hash(self) -> dict[Any, Any]:
        with redis_errors():
            raw: dict[Any, Any] = await self.client.hgetall(self._core.keys.config)
        return raw

    async def set_limit(
        self, scope: str | Scope, limit: LimitSpec, *, shadow: bool = False, actor: str = "api"
    ) -> int:
        return await self._run_config(self._core.set_limit_call(scope, limit, shadow, actor))

    async def get_limit(self, scope: str | Scope) -> ScopeLimit:
        name = scope_name(scope)
        with redis_errors():
            value = await self.client.hget(self._core.keys.config, name)
        if value is None:
            raise LimitNotFound(name)
        return self._core.limits({name: value})[name]

    async def delete_limit(self, scope: str | Scope, *, actor: str = "api") -> int:
        call = self._core.config_call("del", scope_name(scope), "", actor)
        return await self._run_config(call, True)

    async def limits(self) -> dict[str, ScopeLimit]:
        return self._core.limits(await self._config_hash())

    async def pause(self, scope: str | Scope, seconds: float, *, actor: str = "api") -> Pause:
        call = self._core.pause_call(scope, seconds, actor)
        with redis_errors():
            reply = await self._scripts.acall("config.lua", call.keys, call.args)
        return self._core.pause_result(call, reply)

    async def resume(self, scope: str | Scope, *, actor: str = "api") -> bool:
        call = self._core.resume_call(scope, actor)
        with redis_errors():
            reply = await self._scripts.acall("config.lua", call.keys, call.args)
        return int(reply[0]) != -1

    async def pauses(self) -> dict[str, Pause]:
        with redis_errors():
            seconds, micros = await self.client.time()
        return self._core.pauses(await self._config_hash(), seconds * 1000 + micros / 1000)

    async def set_exempt(
        self, tenant: str, mode: ExemptMode | None = "tenant", *, actor: str = "api"
    ) -> int:
        return await self._run_config(self._core.set_exempt_call(tenant, mode, actor))

    async def exemptions(self) -> dict[str, ExemptMode]:
        return self._core.exemptions(await self._config_hash())

    async def set_shadow(self, enabled: bool, *, actor: str = "api") -> int:
        op: Literal["set", "del"] = "set" if enabled else "del"
        return await self._run_config(self._core.config_call(op, "mode:shadow", "1", actor))

    async def set_recording(self, seconds: float | None, *, actor: str = "api") -> int:
        return await self._run_config(recording_call(self._core, seconds, actor))

    async def recording(self) -> float | None:
        with redis_errors():
            value = await self.client.hget(self._core.keys.config, RECORD_FIELD)
        return None if value is None else float(value)

    async def preview(
        self, scope: str | Scope, limit: LimitSpec, *, window: float | None = None
    ) -> Preview:
        with redis_errors():
            config, keys, since, window_s, now = preview_reads(
                self._core, await self._config_hash(), window, await self.client.time()
            )
            pipe = self.client.pipeline(transaction=False)
            self._queue_record_reads(pipe, keys)
            minutes = self._recorded(await pipe.execute())
        return preview_read(scope, limit, config, keys, minutes, since, window_s, now)

    async def config_version(self) -> int:
        with redis_errors():
            return int(await self.client.hget(self._core.keys.config, "_version") or 0)

    async def audit_log(self, count: int = 100) -> list[AuditEntry]:
        with redis_errors():
            raw = await self.client.xrevrange(self._core.keys.audit, count=count)
        return self._core.audit_entries(raw)

    async def apply_config(
        self, config: ConfigSpec | dict[str, Any], *, overwrite: bool = False, actor: str = "config"
    ) -> list[str]:
        spec = config if isinstance(config, ConfigSpec) else parse_config(config)
        present = {f.decode() if isinstance(f, bytes) else f for f in await self._config_hash()}
        written = []
        for field, call in seed_calls(self._core, spec, present, overwrite, actor):
            await self._run_config(call)
            written.append(field)
        return written

    async def aclose(self) -> None:
        """Close the Redis connection pool."""
        await self.client.aclose()

    async def __aenter__(self) -> AsyncLimiter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
