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

import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis.exceptions import RedisError

from ._core import (
    LimitSpec,
    ScriptCall,
    as_slot,
    check_hold,
    concurrency_scope,
    pause_scope,
    redis_errors,
)
from ._decision import PAUSE_PREFIX, Decision, Pause, Slot, decode_limit
from ._errors import CostExceedsBurst, InvalidName
from ._keys import KeySpace, check_shards, shard_of
from ._leases import Rebalancer, RebalanceReport, equal_shares, shared_scope, slices
from ._limiter import Limiter
from ._preview import Preview, preview_read, preview_reads
from ._scopes import Scope, _shown, check_name

DEFAULT_REBALANCE_INTERVAL = 1.0
_MEMO_SIZE = 65536


class ShardedLimiter(Limiter):
    """A ``Limiter`` over N shards; made by ``Limiter(client, shards=N)`` with N > 1.

    Everything ``Limiter`` offers works the same, with these differences: ``remaining``
    of a shared scope (``global``, ``queue:<q>``) in a decision is the tokens of this
    shard's slice; a cost larger than the shard's slice of a shared burst (but not the
    whole burst) is denied until a rebalance gives the shard more, rather than refused;
    ``preview`` and the metrics read the home slot only (open: docs/design.md).
    """

    def __init__(
        self,
        client: Any,
        *,
        shards: int,
        rebalance_interval: float = DEFAULT_REBALANCE_INTERVAL,
        **options: Any,
    ) -> None:
        super().__init__(client, **options)
        n = check_shards(shards)
        interval = float(rebalance_interval)
        if not 0.01 <= interval <= 3600:
            raise InvalidName(
                f"rebalance_interval must be 0.01 to 3600 seconds, got {_shown(rebalance_interval)}"
            )
        home = self._core.keys
        self._core.keys = KeySpace(home.prefix, home.namespace, None, n)
        self.shards = n
        self.shard_keys = [self._core.keys.for_shard(i) for i in range(n)]
        # One core per shard names its keys and keeps its memo of decision calls; the
        # home core keeps the fail-mode state and parses every reply.
        self._cores = []
        for keys in self.shard_keys:
            core = copy.copy(self._core)
            core.keys = keys
            core._calls = {}
            self._cores.append(core)
        self._shard_memo: dict[str, int] = {}
        self.rebalancer = Rebalancer(self, interval)

    # -- routing -----------------------------------------------------------------------
    def shard_of(self, tenant: str) -> int:
        """The shard a tenant's decisions go to."""
        shard = self._shard_memo.get(tenant) if type(tenant) is str else None
        if shard is None:
            shard = shard_of(check_name("tenant", tenant), self.shards)
            if len(self._shard_memo) >= _MEMO_SIZE:
                self._shard_memo.clear()
            self._shard_memo[tenant] = shard
        return shard

    def _decide(
        self,
        mode: Any,
        tenant: str,
        queue: str | None,
        priority: str | None,
        cost: float,
        hold: float | None = None,
    ) -> Decision:
        shard = self.shard_of(tenant)
        call = self._cores[shard].decision_call(mode, tenant, queue, priority, cost, hold)
        try:
            reply = self._scripts.call_packed("acquire.lua", call)
        except RedisError as exc:
            return self._core.decision_failed(exc)
        try:
            decision = self._core.decision(reply, cost)
        except CostExceedsBurst as exc:
            decision = self._beyond_slice(shard, exc)
        if decision.slot is not None:
            slot = Slot(f"{shard}.{decision.slot.token}", decision.slot.scopes)
            decision = dataclasses.replace(decision, slot=slot)
        if self._core.fail_mode_pending:
            self.report_fail_mode()
        if time.monotonic() >= self.rebalancer.due:
            self.rebalancer.tick()
        return decision

    def _beyond_slice(self, shard: int, exc: CostExceedsBurst) -> Decision:
        """A cost above the shard's slice of a shared burst: refused as before when it is
        above the whole burst too; otherwise denied, and counted as a denial of the scope
        on the shard, so the next rebalance gives the shard a larger slice."""
        scope = exc.scope
        if shared_scope(scope) is None:
            raise exc
        with redis_errors():
            whole = self.client.hget(self.keys.config, scope)
        if whole is None:
            raise exc
        limit = decode_limit(scope, whole.decode() if isinstance(whole, bytes) else whole)
        # (Every window must hold the cost; a credit bucket holds burst + credit.)
        most = min(w.capacity + (w.credit or 0) for w in limit.windows)
        if exc.cost > most:
            raise CostExceedsBurst(scope, exc.cost, most) from None
        with redis_errors():
            self.client.hincrby(self.shard_keys[shard].shared, f"d:{scope}", 1)
        return Decision(False, self.rebalancer.interval * 1000, denied_by=scope)

    # -- concurrency -------------------------------------------------------------------
    def _shard_slot(self, held: Decision | Slot | str) -> tuple[int, Slot] | None:
        slot = as_slot(held)
        if slot is None:
            return None
        shard, dot, token = slot.token.partition(".")
        if not dot or not shard.isdigit() or int(shard) >= self.shards:
            raise InvalidName(f"not a slot of this sharded namespace: {_shown(str(slot))}")
        return int(shard), Slot(token, slot.scopes)

    def _slots(self, mode: Any, held: Decision | Slot | str, hold_ms: int) -> bool:
        found = self._shard_slot(held)
        if found is None:
            return False
        shard, slot = found
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
        parsed = Scope.parse(name)
        shards = [self.shard_of(parsed.tenant)] if parsed.tenant is not None else range(self.shards)
        with redis_errors():
            seconds, micros = self.client.time()
            since = f"({seconds * 1_000_000 + micros}"
            return sum(
                int(self.client.zcount(self.shard_keys[i].slots(name), since, "+inf"))
                for i in shards
            )

    # -- configuration -----------------------------------------------------------------
    def _run_config(self, call: ScriptCall, must_exist: bool = False) -> int:
        version = super()._run_config(call, must_exist)
        if version <= 0:
            return version  # (nothing there, nothing changed)
        op, field, value = (str(a) for a in call.args[:3])
        scope = shared_scope(field)
        shares = self.shares().get(scope) if scope else None
        parts = slices(field, "" if op == "del" else value, shares or equal_shares(self.shards))
        flag = "1" if scope is not None and not field.startswith("conc:") else ""
        for i in range(self.shards):
            self.write_shard(i, version, "", "", [field, parts[i], flag])
        return version

    def preview(
        self, scope: str | Scope, limit: LimitSpec, *, window: float | None = None
    ) -> Preview:
        """``Limiter.preview`` over every shard's recorded traffic (each shard records its
        own tenants': the minutes of all shards are added up, then replayed)."""
        with redis_errors():
            config, keys, since, window_s, now = preview_reads(
                self._core, self.client.hgetall(self.keys.config), window, self.client.time()
            )
            pipe = self.client.pipeline()
            for key in keys:
                minute = int(key.rsplit(":", 1)[1])
                for shard in self.shard_keys:
                    pipe.hgetall(shard.record(minute))
            replies = pipe.execute()
        minutes: list[dict[object, object]] = []
        for i in range(len(keys)):
            merged: dict[object, object] = {}
            for fields in replies[i * self.shards : (i + 1) * self.shards]:
                for field, value in fields.items():
                    merged[field] = float(merged.get(field, 0)) + float(value)  # type: ignore[arg-type]
            minutes.append(merged)
        return preview_read(scope, limit, config, keys, minutes, since, window_s, now)

    def pause(self, scope: str | Scope, seconds: float, *, actor: str = "api") -> Pause:
        """``Limiter.pause``: set at home, then on every shard (the same moment: Redis time
        at home, which every shard's decisions compare with their own clock)."""
        pause = super().pause(scope, seconds, actor=actor)
        self._push_pause(pause.scope, str(pause.until_ms))
        return pause

    def resume(self, scope: str | Scope, *, actor: str = "api") -> bool:
        resumed = super().resume(scope, actor=actor)
        if resumed:
            self._push_pause(pause_scope(scope), "")
        return resumed

    def _push_pause(self, scope: str, value: str) -> None:
        field = PAUSE_PREFIX + scope
        version = self.config_version()
        for i in range(self.shards):
            self.write_shard(i, version, "", "", [field, value, ""])

    def write_shard(
        self, shard: int, version: int, epoch: str, mode: str, triples: Sequence[str]
    ) -> int:
        """Write fields of one shard's configuration (lua/shards.lua)."""
        keys = self.shard_keys[shard]
        with redis_errors():
            reply = self._scripts.call(
                "shards.lua", [keys.config, keys.shared], [version, epoch, mode, *triples]
            )
        return int(reply)

    def shard_fields(
        self, config: Mapping[str, str], shares: Mapping[str, Sequence[float]], shard: int
    ) -> list[str]:
        """The whole configuration as shard ``shard`` enforces it, as lua/shards.lua's
        triples."""
        out: list[str] = []
        for field, value in config.items():
            if field.startswith("_"):
                continue
            scope = shared_scope(field)
            of_scope = shares.get(scope) if scope is not None else None
            part = slices(field, value, of_scope or equal_shares(self.shards))[shard]
            out += [field, part, "1" if scope is not None and field == scope else ""]
        return out

    def parse_shares(self, text: str | None, n: int) -> list[float]:
        """Shares as stored at home ("0.5 0.25 0.25"); equal ones when absent or stale."""
        try:
            shares = [float(s) for s in (text or "").split()]
        except ValueError:
            shares = []
        if len(shares) != n or not all(s > 0 for s in shares):
            return equal_shares(n)
        return shares

    def shares(self) -> dict[str, list[float]]:
        """Each shared scope's shares now (by shard), as the last rebalance left them;
        scopes not yet rebalanced are not listed (their shares are equal)."""
        with redis_errors():
            raw = self.client.hgetall(self.keys.share)
        out = {}
        for k, v in raw.items():
            key = k.decode() if isinstance(k, bytes) else k
            if key.startswith("shares:"):
                out[key[len("shares:") :]] = self.parse_shares(
                    v.decode() if isinstance(v, bytes) else v, self.shards
                )
        return out

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
