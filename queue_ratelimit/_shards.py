"""``Limiter(client, shards=N)``: one namespace spread over N hash slots (docs/design.md,
"Shards").

Each tenant lives on one shard (``KeySpace.shard_of``: CRC-32 of its name), whose slot
holds everything a decision for it reads and writes: the shard's copy of the configuration,
the tenant's buckets and slots, and the shard's slices of the shared scopes (``_leases``).
So a decision is still one ``FCALL`` of the same script to one slot, and decisions for
tenants on different shards land on different primaries of a cluster.

The namespace's own slot (its "home", the keys of an unsharded namespace) holds the
configuration as set, the audit, the versions and the lease state: every read of the
configuration (``get_limit``, ``limits``, ``audit_log``...) reads it there as before, and
every change is written there first (config.lua), then to each shard (lua/shards.lua).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import RedisError

from ._core import (
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
from ._leases import Rebalancer, RebalanceReport, shared_scope
from ._limiter import Limiter
from ._scopes import Scope
from ._shard_layout import (
    DEFAULT_REBALANCE_INTERVAL,
    ShardLayout,
    shares_of,
)

__all__ = ["DEFAULT_REBALANCE_INTERVAL", "ShardedLimiter"]


class ShardedLimiter(ShardLayout, Limiter):
    """A ``Limiter`` over N shards; made by ``Limiter(client, shards=N)`` with N > 1.

    Everything ``Limiter`` offers works the same, with these differences: ``remaining``
    of a shared scope (``global``, ``queue:<q>``) in a decision is the tokens of this
    shard's slice; a cost larger than the shard's slice of a shared burst (but not the
    whole burst) is denied until a rebalance gives the shard more, rather than refused.
    ``preview`` adds up every shard's recorded traffic, and the metrics every shard's
    counters (``_sharded_metrics``). The rules are ``ShardLayout``'s, shared with
    ``AsyncShardedLimiter``; this class adds the (synchronous) I/O.
    """

    rebalancer: Rebalancer
    rebalancer_class = Rebalancer

    def _decide(self, mode: Mode, tenant: str, *rest: Any) -> Decision:
        # (rest: queue, priority, cost and perhaps hold, as the limiter's own _decide)
        shard, call = self.route(mode, tenant, *rest)
        cost = rest[2]
        try:
            reply = self._scripts.call_packed("acquire.lua", call)
        except RedisError as exc:
            return self._core.decision_failed(exc)
        try:
            decision = self.in_shard(self._core.decision(reply, cost), shard)
        except CostExceedsBurst as exc:
            decision = self._beyond_slice(shard, exc)
        if self._core.fail_mode_pending:
            self.report_fail_mode()
        if time.monotonic() >= self.rebalancer.due:
            self.rebalancer.tick()
        return decision

    def _beyond_slice(self, shard: int, exc: CostExceedsBurst) -> Decision:
        """A cost above the shard's slice of a shared burst (``slice_denial``); a denial is
        counted as one of the scope on the shard, so the next rebalance gives it more."""
        if shared_scope(exc.scope) is None:
            raise exc
        with redis_errors():
            whole = self.client.hget(self.keys.config, exc.scope)
        decision = self.slice_denial(exc, whole, self.rebalancer.interval * 1000)
        with redis_errors():
            self.client.hincrby(self.shard_keys[shard].shared, f"d:{exc.scope}", 1)
        return decision

    # -- concurrency -------------------------------------------------------------------
    def _slots(self, mode: Any, held: Decision | Slot | str, hold_ms: int) -> bool:
        found = as_slot(held)
        if found is None:
            return False
        shard, slot = self.shard_slot(found)
        call = self._cores[shard].slot_call(mode, slot, hold_ms)
        with redis_errors():
            return bool(self._scripts.call("slots.lua", call.keys, call.args) == 1)

    def release(self, held: Decision | Slot | str) -> bool:
        return self._slots("release", held, 0)

    def extend_slot(self, held: Decision | Slot | str, hold: float = 60.0) -> bool:
        return self._slots("extend", held, check_hold(hold))

    def running(self, scope: str | Scope) -> int:
        """Jobs holding a slot of ``scope`` now: on the tenant's shard for a tenant scope,
        summed over the shards for a shared one."""
        name = concurrency_scope(scope)
        with redis_errors():
            seconds, micros = self.client.time()
            since = f"({seconds * 1_000_000 + micros}"
            return sum(
                int(self.client.zcount(self.shard_keys[i].slots(name), since, "+inf"))
                for i in self.running_on(name)
            )

    # -- configuration -----------------------------------------------------------------
    def _run_config(self, call: ScriptCall, must_exist: bool = False) -> int:
        version = super()._run_config(call, must_exist)
        if version <= 0:
            return version  # (nothing there, nothing changed)
        for i, triple in enumerate(self.config_triples(call, self.shares())):
            self.write_shard(i, version, "", "", triple)
        return version

    def pause(self, scope: str | Scope, seconds: float, *, actor: str = "api") -> Pause:
        """``Limiter.pause``: set at home, then on every shard (the same moment: Redis time
        at home, which every shard's decisions compare with their own clock). The pauses
        that ran out and that the home slot forgets meanwhile are deleted on the shards."""
        call = self._core.pause_call(scope, seconds, actor)
        reply = self._pause_call(call)
        pause = self._core.pause_result(call, reply)
        self._push(int(reply[0]), self.pause_triple(pause.scope, str(pause.until_ms)))
        return pause

    def resume(self, scope: str | Scope, *, actor: str = "api") -> bool:
        reply = self._pause_call(self._core.resume_call(scope, actor))
        if int(reply[0]) < 0:
            return False
        self._push(int(reply[0]), self.pause_triple(pause_scope(scope), ""))
        return True

    def _pause_call(self, call: ScriptCall) -> list[Any]:
        """config.lua's pause or resume at home; the pauses it forgot (those that ran out)
        are deleted on every shard."""
        with redis_errors():
            pipe = self.client.pipeline(transaction=False)
            self.queue_pause_index_read(pipe)
            candidates = self.ran_out(*pipe.execute())
            reply: list[Any] = self._scripts.call("config.lua", call.keys, call.args)
            if candidates:
                pipe = self.client.pipeline(transaction=False)
                self.queue_forgotten_read(pipe, candidates)
                version, triples = self.forgotten(candidates, *pipe.execute())
                if triples:
                    self._push(version, triples)
        return reply

    def _push(self, version: int, triples: list[str]) -> None:
        for i in range(self.shards):
            self.write_shard(i, version, "", "", triples)

    def write_shard(
        self, shard: int, version: int, epoch: str, mode: str, triples: Sequence[str]
    ) -> int:
        """Write fields of one shard's configuration (lua/shards.lua)."""
        return self._shards_lua(self.write_call(shard, version, epoch, mode, triples))

    def write_state(self, epoch: str, state: Mapping[str, str]) -> int:
        """Write a rebalance round's state at home (lua/shards.lua "state"): the fields
        written, or -1 when a newer round took an epoch since ``epoch`` (nothing written)."""
        return self._shards_lua(self.state_call(epoch, state))

    def _shards_lua(self, call: tuple[list[str], list[object]]) -> int:
        with redis_errors():
            return int(self._scripts.call("shards.lua", *call))

    def shares(self) -> dict[str, list[float]]:
        """Each shared scope's shares now (by shard), as the last rebalance left them;
        scopes not yet rebalanced are not listed (their shares are equal)."""
        with redis_errors():
            return shares_of(self.client.hgetall(self.keys.share), self.shards)

    def flush_counters(self) -> int:
        """Write the counts the server keeps in memory for every shard (as
        ``_counters.flush_counters`` does for an unsharded namespace): readers of a shard's
        counters call it first. Returns how many decisions they counted."""
        if self._scripts.transport == "evalsha":
            return 0
        with redis_errors():
            return sum(
                int(self._scripts.call("counters.lua", [keys.shared], []))
                for keys in self.shard_keys
            )

    def rebalance(self) -> RebalanceReport:
        """Move the shared scopes' slices by the demand seen since the last rebalance, now
        (decisions do this themselves every ``rebalance_interval``, one process at a time).

        Raises:
            BackendUnavailable / BackendError: as for every call.
        """
        return self.rebalancer.run()
