"""What ``ShardedLimiter`` and ``AsyncShardedLimiter`` share: the I/O-free parts of a
sharded namespace (docs/design.md, "Shards").

``ShardLayout`` is mixed into both: routing a tenant to its shard, the shard's keys and
decision-call memo, naming a slot after its shard and reading it back, what each shard's
configuration holds after a change, and turning replies into results. Each limiter only
adds its I/O around these (one with ``redis``, the other with ``redis.asyncio``), so the
two decide alike by construction.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._client import queue_time
from ._core import LimiterBase, LimiterCore, Mode, ScriptCall
from ._decision import PAUSE_PREFIX, Decision, Slot, decode_limit
from ._errors import CostExceedsBurst, InvalidName
from ._keys import KeySpace, check_shards, shard_of
from ._leases import _text, equal_shares, parse_shares, shard_fields, shared_scope, slices
from ._scopes import Scope, _shown, check_name

DEFAULT_REBALANCE_INTERVAL = 1.0
_MEMO_SIZE = 65536


def check_interval(value: object) -> float:
    """A rebalance interval in seconds (0.01 to 3600), else ``InvalidName``."""
    try:
        interval = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        interval = float("nan")
    if not 0.01 <= interval <= 3600:
        raise InvalidName(f"rebalance_interval must be 0.01 to 3600 seconds, got {_shown(value)}")
    return interval


def shares_of(raw: Mapping[Any, Any], n: int) -> dict[str, list[float]]:
    """Each rebalanced shared scope's shares, from the home slot's lease hash."""
    out = {}
    for k, v in raw.items():
        key = _text(k)
        if key.startswith("shares:"):
            out[key[len("shares:") :]] = parse_shares(_text(v), n)
    return out


def merge_minutes(replies: Sequence[Mapping[Any, Any]], n: int) -> list[dict[object, object]]:
    """Each recorded minute summed over the shards (``replies``: every shard's hash of the
    first minute, then of the second...)."""
    minutes: list[dict[object, object]] = []
    for start in range(0, len(replies), n):
        merged: dict[object, object] = {}
        for fields in replies[start : start + n]:
            for field, value in fields.items():
                merged[field] = float(merged.get(field, 0)) + float(value)  # type: ignore[arg-type]
        minutes.append(merged)
    return minutes


class ShardLayout(LimiterBase):
    """Mixed into a limiter (``Limiter`` or ``AsyncLimiter``: ``class X(ShardLayout,
    Limiter)``) to spread it over shards; ``rebalancer_class`` names its rebalancer."""

    rebalancer_class: Callable[[Any, float], Any]
    shards: int
    shard_keys: list[KeySpace]
    _cores: list[LimiterCore]

    def __init__(
        self,
        client: Any,
        *,
        shards: int,
        rebalance_interval: float = DEFAULT_REBALANCE_INTERVAL,
        **options: Any,
    ) -> None:
        super().__init__(client, **options)  # (the limiter's own)
        interval = check_interval(rebalance_interval)
        n = check_shards(shards)
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
        self.rebalancer = self.rebalancer_class(self, interval)

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

    def route(self, mode: Mode, tenant: str, *rest: Any) -> tuple[int, ScriptCall]:
        """The tenant's shard and the decision call to make there (``rest``: queue,
        priority, cost, hold, as ``LimiterCore.decision_call`` takes them)."""
        shard = self.shard_of(tenant)
        return shard, self._cores[shard].decision_call(mode, tenant, *rest)

    @staticmethod
    def in_shard(decision: Decision, shard: int) -> Decision:
        """A decision whose slot is named after its shard ("<shard>.<token>")."""
        if decision.slot is None:
            return decision
        slot = Slot(f"{shard}.{decision.slot.token}", decision.slot.scopes)
        return dataclasses.replace(decision, slot=slot)

    def shard_slot(self, slot: Slot) -> tuple[int, Slot]:
        """The shard a slot was taken on, and the slot as that shard's scripts name it."""
        shard, dot, token = slot.token.partition(".")
        if not dot or not shard.isdigit() or int(shard) >= self.shards:
            raise InvalidName(f"not a slot of this sharded namespace: {_shown(str(slot))}")
        return int(shard), Slot(token, slot.scopes)

    def running_on(self, scope_name: str) -> range | list[int]:
        """The shards whose slots of a scope count: its tenant's, or all for a shared one."""
        parsed = Scope.parse(scope_name)
        if parsed.tenant is not None:
            return [self.shard_of(parsed.tenant)]
        return range(self.shards)

    # -- slices beyond a shard ---------------------------------------------------------
    @staticmethod
    def slice_denial(exc: CostExceedsBurst, whole: object, wait_ms: float) -> Decision:
        """A cost above a shard's slice of a shared burst (``whole``: the scope's limit as
        set at home, or None): refused as before when it is above the whole burst too,
        else a denial by the scope (which the caller counts on the shard, so the next
        rebalance gives the shard a larger slice)."""
        if whole is None:
            raise exc
        limit = decode_limit(exc.scope, _text(whole))
        # (Every window must hold the cost; a credit bucket holds burst + credit.)
        most = min(w.capacity + (w.credit or 0) for w in limit.windows)
        if exc.cost > most:
            raise CostExceedsBurst(exc.scope, exc.cost, most) from None
        return Decision(False, wait_ms, denied_by=exc.scope)

    # -- configuration -----------------------------------------------------------------
    def config_triples(
        self, call: ScriptCall, shares: Mapping[str, Sequence[float]]
    ) -> list[list[str]]:
        """Each shard's lua/shards.lua triples for a configuration change (``call``, run
        at home), with the shared scopes' current ``shares``."""
        op, field, value = (str(a) for a in call.args[:3])
        scope = shared_scope(field)
        of_scope = shares.get(scope) if scope else None
        parts = slices(field, "" if op == "del" else value, of_scope or equal_shares(self.shards))
        flag = "1" if scope is not None and not field.startswith("conc:") else ""
        return [[field, parts[i], flag] for i in range(self.shards)]

    @staticmethod
    def pause_triple(scope: str, until_ms: str) -> list[str]:
        """The triple that sets a pause on every shard ("" ends it)."""
        return [PAUSE_PREFIX + scope, until_ms, ""]

    # A pause or resume at home (lua/config.lua) forgets the pauses that ran out: their
    # fields are deleted there, without a new version. The shards forget them too: the
    # candidates are read from the pause index before the call, and those the home slot no
    # longer holds after it are deleted on every shard, at the version read after it (any
    # later change of those fields has a newer one, and wins on the shards, lua/shards.lua).
    def queue_pause_index_read(self, pipe: Any) -> None:
        queue_time(pipe, self._core.keys.pauses)
        pipe.zrangebyscore(self._core.keys.pauses, "-inf", "+inf", withscores=True)

    @staticmethod
    def ran_out(now: Sequence[int], index: Sequence[tuple[Any, float]]) -> list[str]:
        """The pause fields a pause or resume now will forget (lua/config.lua)."""
        now_ms = now[0] * 1000 + now[1] / 1000
        return [PAUSE_PREFIX + _text(scope) for scope, until in index if until <= now_ms]

    def queue_forgotten_read(self, pipe: Any, fields: Sequence[str]) -> None:
        pipe.hget(self._core.keys.config, "_version")
        pipe.hmget(self._core.keys.config, fields)

    @staticmethod
    def forgotten(
        fields: Sequence[str], version: object, values: Sequence[object]
    ) -> tuple[int, list[str]]:
        """The version and the triples deleting the ``fields`` the home slot forgot."""
        gone = [f for f, v in zip(fields, values, strict=True) if v is None]
        return int(_text(version or 0)), [x for f in gone for x in (f, "", "")]

    def _queue_record_reads(self, pipe: Any, keys: Sequence[str]) -> None:
        """Every shard's record of each recorded minute (``keys``: home's names of them):
        each shard records its own tenants' traffic."""
        for key in keys:
            minute = int(key.rsplit(":", 1)[1])
            for shard in self.shard_keys:
                pipe.hgetall(shard.record(minute))

    def _recorded(self, replies: Sequence[Any]) -> list[Any]:
        """Each recorded minute, added up over the shards."""
        return merge_minutes(replies, self.shards)

    def write_call(
        self, shard: int, version: int, epoch: str, mode: str, triples: Sequence[str]
    ) -> tuple[list[str], list[object]]:
        """Keys and arguments of lua/shards.lua writing fields of one shard."""
        keys = self.shard_keys[shard]
        return [keys.config, keys.shared], [version, epoch, mode, *triples]

    def state_call(self, epoch: str, state: Mapping[str, str]) -> tuple[list[str], list[object]]:
        """Keys and arguments of lua/shards.lua writing a round's state at home (the lease
        hash): refused (-1) once a newer round has taken an epoch."""
        pairs = [part for field, value in state.items() for part in (field, value)]
        return [self._core.keys.share], [0, epoch, "state", *pairs]

    def shard_fields(
        self, config: Mapping[str, str], shares: Mapping[str, Sequence[float]], shard: int
    ) -> list[str]:
        """The whole configuration as shard ``shard`` enforces it, as lua/shards.lua's
        triples."""
        return shard_fields(config, shares, shard, self.shards)

    def parse_shares(self, raw: str | None, n: int) -> list[float]:
        """Shares as stored at home ("0.5 0.25 0.25"); equal ones when absent or stale."""
        return parse_shares(raw, n)


def layouts(limiter: LimiterBase) -> list[KeySpace]:
    """The key layouts that hold a namespace's tenants (their backlogs, buckets, slots):
    each shard's for a sharded limiter, else the namespace's own. Readers that add up what
    waits (``rq info``, RQ's ``job_ids``, ``celery inspect qrl_gate``) read every one."""
    if isinstance(limiter, ShardLayout):
        return list(limiter.shard_keys)
    return [limiter.keys]


def tenant_keys(limiter: LimiterBase, tenant: str) -> KeySpace:
    """The key layout holding a tenant's keys: its shard's, or the namespace's own."""
    if isinstance(limiter, ShardLayout):
        return limiter.shard_keys[limiter.shard_of(tenant)]
    return limiter.keys
