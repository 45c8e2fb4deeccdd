"""``Limiter``: the synchronous, Redis-backed entry point."""

from __future__ import annotations

from typing import Any, Literal

from redis.exceptions import RedisError

from ._breaker import DEFAULT_BACKOFF
from ._client import REDIS_TIMEOUT, queue_time, redis_client
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
from ._durability import EvictionStatus, eviction_status, judge_eviction
from ._errors import LimitNotFound
from ._preview import RECORD_FIELD, Preview, preview_read, preview_reads, recording_call
from ._scopes import Scope, scope_name
from ._shard_count import judge_shards, queue_shard_record
from ._urls import check_redis_url


class Limiter(LimiterBase):
    """Distributed token buckets per tenant, tenant-and-queue, queue and globally.

    Every decision is one atomic ``EVALSHA`` on Redis's clock, so any number of processes
    share the same buckets without overspending. Limits live in Redis: a ``set_limit`` in
    one process applies to the next decision in all of them.

    >>> limiter = Limiter.from_url("redis://localhost:6379/0", namespace="example")
    >>> limiter.set_limit("tenant:*", "100/s")          # every tenant: 100 jobs per second
    1
    >>> decision = limiter.acquire("acme", queue="emails")
    >>> decision.allowed, decision.remaining["tenant:acme"]
    (True, 99.0)

    Args:
        client: a redis-py ``Redis`` or ``RedisCluster`` client.
        namespace: isolates one deployment's keys (and is their Cluster hash tag).
        prefix: the first part of every key.
        fail_mode: when Redis is unreachable, ``"raise"`` ``BackendUnavailable``, ``"open"``
            (allow, marked ``degraded``) or ``"closed"`` (deny for ``closed_retry_ms``).
        closed_retry_ms: the wait reported by a fail-closed decision.
        counter_retention: seconds an idle tenant's counters are kept before they expire.
        eviction: what to do, at the first call, when the server may evict keys (an
            ``allkeys-*`` or ``volatile-*`` maxmemory-policy under a memory limit, which
            loses parked jobs, limits and bucket state): ``"warn"`` (log a warning),
            ``"refuse"`` (raise ``ConfigError`` from every call) or ``"ignore"``.
        shards: spread the namespace over this many hash slots (1 to 1024; default 1, one
            slot): each tenant is decided on its own shard, so a Redis Cluster spreads the
            decisions over its primaries; the shared scopes are sliced between the shards
            and rebalanced by demand (docs/design.md, "Shards").
        rebalance_interval: with shards, seconds between rebalances of the slices
            (default 1; ignored without shards).
    """

    @classmethod
    def _sharded(cls) -> type[Any]:
        from ._shards import ShardedLimiter  # (here: it subclasses Limiter)

        return ShardedLimiter

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float | None = REDIS_TIMEOUT,
        backoff: tuple[float, float] | None = DEFAULT_BACKOFF,
        **options: Any,
    ) -> Limiter:
        """Connect to a ``redis://``, ``rediss://`` or ``unix://`` URL; options as ``__init__``.

        Connecting, and every reply, waits at most ``timeout`` seconds (default 2; None: no
        bound), so the fail mode engages when a server stops answering; ``socket_timeout``
        and ``socket_connect_timeout`` in the URL win over it. Once a call has waited out
        the timeout, the next ones fail at once (the fail mode applies without a wait)
        until Redis answers a probe in the background, sent ``backoff[0]`` seconds later
        and then at intervals doubling up to ``backoff[1]`` (default 0.25 s to 5 s; None:
        every call waits out its own timeout).

        Raises:
            ConfigError: the URL is empty or malformed (shown with its password masked).
        """
        return cls(redis_client(check_redis_url(url), timeout, backoff), **options)

    def eviction_status(self) -> EvictionStatus:
        """Whether the server may evict this limiter's keys (one ``INFO memory``)."""
        return eviction_status(self.client)

    def _eviction_check(self) -> None:
        judge_eviction(self.eviction_status(), self.eviction)

    def _shard_check(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        queue_shard_record(pipe, self.keys, self.shards)
        judge_shards(self.keys, self.shards, pipe.execute()[1])

    # -- decisions ---------------------------------------------------------------------
    def acquire(
        self,
        tenant: str,
        queue: str | None = None,
        priority: str | None = None,
        cost: float = 1,
        *,
        hold: float | None = None,
    ) -> Decision:
        """Take ``cost`` tokens from every bucket that applies, or none if any lacks them.

        Where concurrency caps apply (``set_concurrency``), the job also needs a free slot
        of each, and takes them in the same atomic step: ``decision.slot`` holds them until
        ``release`` or until ``hold`` seconds (default 60) have passed, whichever is first
        (``extend_slot`` renews them). Without a cap there is no slot and nothing to release.

        Raises:
            InvalidName: a malformed tenant, queue or priority.
            InvalidCost: cost not a number in [1e-6, 1e12], or a bad ``hold``.
            CostExceedsBurst: cost is larger than an enforced bucket can ever hold.
            BackendUnavailable: Redis is unreachable and ``fail_mode`` is ``"raise"``.
        """
        return self._decide("acquire", tenant, queue, priority, cost, hold)

    def peek(
        self, tenant: str, queue: str | None = None, priority: str | None = None, cost: float = 1
    ) -> Decision:
        """What ``acquire`` would decide now, without consuming anything."""
        return self._decide("peek", tenant, queue, priority, cost)

    def refund(
        self, tenant: str, queue: str | None = None, priority: str | None = None, cost: float = 1
    ) -> Decision:
        """Return ``cost`` tokens to every bucket that applies (never above its burst)."""
        return self._decide("refund", tenant, queue, priority, cost)

    def _decide(
        self,
        mode: Mode,
        tenant: str,
        queue: str | None,
        priority: str | None,
        cost: float,
        hold: float | None = None,
    ) -> Decision:
        call = self._core.decision_call(mode, tenant, queue, priority, cost, hold)
        try:  # (no context manager here: this is the hot path)
            reply = self._scripts.call_packed("acquire.lua", call)
        except RedisError as exc:
            return self._core.decision_failed(exc)
        decision = self._core.decision(reply, cost)
        if self._core.fail_mode_pending:  # Redis is back after an outage
            self.report_fail_mode()
        return decision

    def report_fail_mode(self) -> None:
        """Add the fail-mode decisions this process made while Redis was unreachable to the
        namespace's counters (the metrics' ``queue_ratelimit_fail_mode_events_total``);
        done by the first decision after Redis is back. Kept for later if Redis is away."""
        pipe = self.client.pipeline(transaction=False)
        counts = self._core.queue_fail_mode_counts(pipe)
        try:
            pipe.execute()
        except RedisError:  # still away: kept for the next time
            self._core.fail_mode_unsent(counts)

    # -- concurrency -------------------------------------------------------------------
    def release(self, held: Decision | Slot | str) -> bool:
        """Give back the concurrency slots a decision took (``decision``, ``decision.slot``
        or ``str(slot)``). True if they were held; False when they were released already
        or their hold ran out (then nothing changes), or the decision holds no slot.

        Raises:
            BackendUnavailable: Redis is unreachable; the slots then come back when their
                hold runs out (or call ``release`` again: it is idempotent).
        """
        slot = as_slot(held)
        if slot is None:
            return False
        call = self._core.slot_call("release", slot, 0)
        with redis_errors():
            return bool(self._scripts.call("slots.lua", call.keys, call.args) == 1)

    def extend_slot(self, held: Decision | Slot | str, hold: float = DEFAULT_HOLD) -> bool:
        """Hold the slots ``hold`` seconds from now (for a job running longer than its hold).
        False, and the slots are given up, if they were released or their hold ran out."""
        slot = as_slot(held)
        if slot is None:
            return False
        call = self._core.slot_call("extend", slot, check_hold(hold))
        with redis_errors():
            return bool(self._scripts.call("slots.lua", call.keys, call.args) == 1)

    def set_concurrency(self, scope: str | Scope, n: int | None, *, actor: str = "api") -> int:
        """At most ``n`` jobs of ``scope`` hold a slot at once, across every worker and host
        (``None`` removes the cap); returns the new configuration version.

        Scopes as for ``set_limit``; ``tenant:*`` and ``tenant:*:queue:<q>`` give every
        tenant a cap of its own. Exempt tenants skip tenant caps (``"all"``: every cap).

        Raises:
            InvalidLimit: ``n`` is not a whole number from 1 to 1,000,000.
            LimitNotFound: ``None`` for a scope that has no cap.
        """
        call = self._core.set_concurrency_call(scope, n, actor)
        return self._run_config(call, must_exist=n is None)

    def get_concurrency(self, scope: str | Scope) -> int | None:
        """The concurrency cap configured for exactly this scope, or None."""
        name = scope_name(scope)
        with redis_errors():
            value = self.client.hget(self._core.keys.config, CONCURRENCY_PREFIX + name)
        return None if value is None else int(value)

    def concurrency(self) -> dict[str, int]:
        """Every concurrency cap, by scope."""
        with redis_errors():
            return self._core.concurrency(self.client.hgetall(self._core.keys.config))

    def running(self, scope: str | Scope) -> int:
        """Jobs holding a slot of ``scope`` now (live holds: not released, not run out).
        ``scope`` names one tenant (``tenant:acme``), not a default."""
        key = self._core.keys.slots(concurrency_scope(scope))
        with redis_errors():
            seconds, micros = self.client.time()
            return int(self.client.zcount(key, f"({seconds * 1_000_000 + micros}", "+inf"))

    # -- configuration -----------------------------------------------------------------
    def _run_config(self, call: ScriptCall, must_exist: bool = False) -> int:
        with redis_errors():
            reply = self._scripts.call("config.lua", call.keys, call.args)
        return self._core.config_version(reply, str(call.args[1]), must_exist)

    def set_limit(
        self, scope: str | Scope, limit: LimitSpec, *, shadow: bool = False, actor: str = "api"
    ) -> int:
        """Set a scope's limit; returns the new configuration version.

        ``scope`` is ``"global"``, ``"queue:<q>"``, ``"tenant:<t>"``, ``"tenant:<t>:queue:<q>"``
        or a default for every tenant (``"tenant:*"``, ``"tenant:*:queue:<q>"``). With
        ``shadow=True`` the scope decides and counts but never denies.

        ``limit`` is a ``Limit`` or its text (``"100/s"``), or a list of up to four windows of
        different periods (``["100/s", "10000/d"]``) that must every one admit a job.

        Raises:
            InvalidLimit: a malformed limit, or a list of windows that is empty, longer than
                four or gives a period twice.
        """
        return self._run_config(self._core.set_limit_call(scope, limit, shadow, actor))

    def get_limit(self, scope: str | Scope) -> ScopeLimit:
        """The limit configured for exactly this scope. Raises ``LimitNotFound``."""
        name = scope_name(scope)
        with redis_errors():
            value = self.client.hget(self._core.keys.config, name)
        if value is None:
            raise LimitNotFound(name)
        return self._core.limits({name: value})[name]

    def delete_limit(self, scope: str | Scope, *, actor: str = "api") -> int:
        """Remove a scope's limit (and its bucket). Raises ``LimitNotFound``."""
        return self._run_config(self._core.config_call("del", scope_name(scope), "", actor), True)

    def limits(self) -> dict[str, ScopeLimit]:
        """Every configured limit, by scope name."""
        with redis_errors():
            return self._core.limits(self.client.hgetall(self._core.keys.config))

    # -- pauses ------------------------------------------------------------------------
    def pause(self, scope: str | Scope, seconds: float, *, actor: str = "api") -> Pause:
        """Admit nothing of ``scope`` for ``seconds`` (on Redis's clock), across every
        worker: for a downstream that answered ``429 Retry-After``. Decisions in the scope
        are denied with ``paused=True``, ``denied_by=scope`` and ``wait_ms`` the time left.

        A pause only ever grows: a shorter one while a longer runs leaves the longer (the
        returned ``Pause`` says which). It ends by itself, or with ``resume``. It applies
        whatever the exemptions and shadow mode, and is in the audit log.

        Args:
            scope: ``global``, ``queue:<q>``, ``tenant:<t>``, ``tenant:<t>:queue:<q>`` or
                ``priority:<p>`` (not a tenant default).
            seconds: how long, at most 30 days.

        Raises:
            InvalidScope / InvalidName: a scope that names nothing that can be paused.
            ConfigError: ``seconds`` not a finite number in (0, 30 days].
            TooManyPauses: a new pause (not the lengthening of a running one) while the
                namespace runs the most it may (10,000; those that ran out
                do not count).
        """
        call = self._core.pause_call(scope, seconds, actor)
        with redis_errors():
            reply = self._scripts.call("config.lua", call.keys, call.args)
        return self._core.pause_result(call, reply)

    def resume(self, scope: str | Scope, *, actor: str = "api") -> bool:
        """End a pause now; False when the scope was not paused (or its pause ran out)."""
        call = self._core.resume_call(scope, actor)
        with redis_errors():
            reply = self._scripts.call("config.lua", call.keys, call.args)
        return int(reply[0]) != -1

    def pauses(self) -> dict[str, Pause]:
        """The pauses running now, by scope."""
        with redis_errors():
            pipe = self.client.pipeline(transaction=False)
            queue_time(pipe, self._core.keys.config)
            pipe.hgetall(self._core.keys.config)
            (seconds, micros), raw = pipe.execute()
        return self._core.pauses(raw, seconds * 1000 + micros / 1000)

    def set_exempt(
        self, tenant: str, mode: ExemptMode | None = "tenant", *, actor: str = "api"
    ) -> int:
        """Exempt a VIP tenant from its tenant caps (``"tenant"``) or from every cap
        (``"all"``); ``None`` ends the exemption."""
        return self._run_config(self._core.set_exempt_call(tenant, mode, actor))

    def exemptions(self) -> dict[str, ExemptMode]:
        """Exempt tenants and their mode."""
        with redis_errors():
            return self._core.exemptions(self.client.hgetall(self._core.keys.config))

    def set_shadow(self, enabled: bool, *, actor: str = "api") -> int:
        """Put the whole namespace in shadow (dry-run) mode, or take it out."""
        op: Literal["set", "del"] = "set" if enabled else "del"
        return self._run_config(self._core.config_call(op, "mode:shadow", "1", actor))

    def set_recording(self, seconds: float | None, *, actor: str = "api") -> int:
        """Record traffic for previews (``preview``), keeping the last ``seconds`` (60 to
        86,400); ``None`` stops recording. Each decision then also counts its cost (or its
        denial) in a per-second record: one more ``redis.call`` per decision, and memory
        that grows with the active (tenant, queue) pairs per second kept."""
        return self._run_config(recording_call(self._core, seconds, actor))

    def recording(self) -> float | None:
        """Seconds of traffic kept for previews, or None when recording is off."""
        with redis_errors():
            value = self.client.hget(self._core.keys.config, RECORD_FIELD)
        return None if value is None else float(value)

    def preview(
        self, scope: str | Scope, limit: LimitSpec, *, window: float | None = None
    ) -> Preview:
        """What ``limit`` on ``scope`` would have done to the recorded traffic of the last
        ``window`` seconds (default: all that recording keeps), without changing anything.
        ``limit`` is what ``set_limit`` takes: one limit, or several windows (every one must
        admit), each with its burst and credit.

        >>> limiter.set_recording(900)
        >>> ...                                     # traffic flows for a while
        >>> p = limiter.preview("tenant:*", "20/s")
        >>> p.delayed_fraction, p.max_delay_s, p.buckets[0].scope
        (0.04, 3.2, 'tenant:bigco')

        Raises:
            ConfigError: recording is off, or ``window`` is outside what it keeps.
        """
        with redis_errors():
            config, keys, since, window_s, now = preview_reads(
                self._core, self.client.hgetall(self._core.keys.config), window, self.client.time()
            )
            pipe = self.client.pipeline(transaction=False)
            self._queue_record_reads(pipe, keys)
            minutes = self._recorded(pipe.execute())
        return preview_read(scope, limit, config, keys, minutes, since, window_s, now)

    def config_version(self) -> int:
        """A number that grows with every configuration change."""
        with redis_errors():
            return int(self.client.hget(self._core.keys.config, "_version") or 0)

    def audit_log(self, count: int = 100) -> list[AuditEntry]:
        """The latest configuration changes, newest first."""
        with redis_errors():
            raw = self.client.xrevrange(self._core.keys.audit, count=count)
        return self._core.audit_entries(raw)

    def apply_config(
        self, config: ConfigSpec | dict[str, Any], *, overwrite: bool = False, actor: str = "config"
    ) -> list[str]:
        """Seed Redis from static configuration; returns the fields written.

        Redis holds the truth: without ``overwrite`` a scope already set (by an operator at
        run time, say) is left alone.
        """
        spec = config if isinstance(config, ConfigSpec) else parse_config(config)
        with redis_errors():
            present = {
                f.decode() if isinstance(f, bytes) else f
                for f in self.client.hkeys(self._core.keys.config)
            }
        written = []
        for field, call in seed_calls(self._core, spec, present, overwrite, actor):
            self._run_config(call)
            written.append(field)
        return written

    def close(self) -> None:
        """Close the Redis connection pool."""
        self.client.close()

    def __enter__(self) -> Limiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
