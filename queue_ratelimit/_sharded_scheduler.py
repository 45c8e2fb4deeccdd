"""``FairScheduler`` on a sharded namespace: lanes per shard (docs/design.md, "Shards").

Each shard has the whole scheduler layout of an unsharded namespace in its own slot, and a
tenant's work lives on its tenant's shard (as its buckets do): ``submit``, ``gate``,
``hint``, ``route`` and the settlement of a dispatched item go to that one shard, each
still one atomic script call. ``dispatch`` polls the shards in turn, starting one further
on each call, and returns what the first shard with anything admissible hands out: so a
dispatch is one atomic step on one shard (a lost reply concerns one call, as before), and
every shard's lanes are served. Inside a shard the order is weighted-fair as before;
between shards it is round-robin by call, and a shared cap is split between them by the
lease rebalancer (``_leases``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Unpack

from ._decision import Slot
from ._limiter import Limiter
from ._scheduler import (
    TRANSIT_GRACE,
    Dispatch,
    DispatchedItem,
    DispatchOptions,
    FairScheduler,
    GateVerdict,
    HeldBack,
    Hint,
    SubmitItem,
)
from ._scopes import check_item_id

if TYPE_CHECKING:
    from ._shards import ShardedLimiter


def shard_view(limiter: ShardedLimiter, shard: int) -> Limiter:
    """A ``Limiter`` over one shard's keys (its scheduler and buckets), sharing the sharded
    limiter's client and scripts; configuration changes made through it (weights) go
    through the sharded limiter, so they reach the home slot and every shard."""
    view = object.__new__(Limiter)
    view.__dict__.update(
        client=limiter.client,
        _core=limiter._cores[shard],
        _scripts=limiter._scripts,
        eviction=limiter.eviction,
        _run_config=limiter._run_config,
    )
    return view


def _in_shard(slot: Slot | None, shard: int) -> Slot | None:
    """A slot a shard's scripts took, named so that ``ShardedLimiter.release`` finds it."""
    return None if slot is None else Slot(f"{shard}.{slot.token}", slot.scopes)


def _item_in_shard(item: DispatchedItem, shard: int) -> DispatchedItem:
    if item.slot is None:
        return item
    return dataclasses.replace(item, slot=_in_shard(item.slot, shard))


class ShardedScheduler(FairScheduler):
    """``FairScheduler(limiter)`` for a limiter with shards; the same methods.

    Differences: ``dispatch`` returns one shard's items per call (fewer than ``max_items``
    may come although other shards have work: call again); ``dispatch_call`` is refused
    (no single call covers every shard); ``counts_key`` names the first shard's hash
    (``counts_keys`` names all); settling a bare id (not the ``DispatchedItem``) asks the
    shards in turn.
    """

    def __init__(
        self,
        limiter: Limiter,
        *,
        lease: float = 60.0,
        max_skips: int = 32,
        transit_grace: float = TRANSIT_GRACE,
    ) -> None:
        from ._shards import ShardedLimiter  # (here: _shards imports _limiter, as this does)

        if not isinstance(limiter, ShardedLimiter):
            raise TypeError("ShardedScheduler needs a limiter with shards")
        super().__init__(limiter, lease=lease, max_skips=max_skips, transit_grace=transit_grace)
        self.sharded = limiter
        self.parts = [
            FairScheduler(
                shard_view(limiter, i),
                lease=lease,
                max_skips=max_skips,
                transit_grace=transit_grace,
            )
            for i in range(limiter.shards)
        ]
        self._turn = 0

    def _tick(self) -> None:
        """Rebalance the shared scopes' slices when due (workers that only gate and
        dispatch make no ``Limiter`` decision that would)."""
        rebalancer = self.sharded.rebalancer
        if time.monotonic() >= rebalancer.due:
            rebalancer.tick()

    def part(self, tenant: str) -> tuple[int, FairScheduler]:
        shard = self.sharded.shard_of(tenant)
        return shard, self.parts[shard]

    # -- submitting ----------------------------------------------------------------------
    def submit(self, tenant: str, item_id: str, **options: Any) -> Any:
        return self.part(tenant)[1].submit(tenant, item_id, **options)

    def submit_many(
        self, items: Sequence[SubmitItem], *, max_backlog: int = 0
    ) -> list[Literal["queued", "duplicate", "full"]]:
        by_shard: dict[int, list[int]] = {}
        for n, item in enumerate(items):
            by_shard.setdefault(self.sharded.shard_of(item.tenant), []).append(n)
        out: list[Literal["queued", "duplicate", "full"]] = ["duplicate"] * len(items)
        for shard, positions in by_shard.items():
            chosen = [items[n] for n in positions]
            outcomes = self.parts[shard].submit_many(chosen, max_backlog=max_backlog)
            for n, outcome in zip(positions, outcomes, strict=True):
                out[n] = outcome
        return out

    def submit_calls(
        self, items: Sequence[SubmitItem], *, max_backlog: int = 0
    ) -> list[tuple[list[str], list[Any]]]:
        return [self.part(i.tenant)[1].submit_calls([i], max_backlog=max_backlog)[0] for i in items]

    def route(self, tenant: str, item_id: str, list_key: str, **options: Any) -> Any:
        return self.part(tenant)[1].route(tenant, item_id, list_key, **options)

    def adopt(
        self, queue: str, list_key: str, jobs: Sequence[tuple[str, str | None, str, float]]
    ) -> int:
        by_shard: dict[int, list[tuple[str, str | None, str, float]]] = {}
        for job in jobs:
            shard = 0 if job[1] is None else self.sharded.shard_of(job[1])
            by_shard.setdefault(shard, []).append(job)
        return sum(self.parts[s].adopt(queue, list_key, group) for s, group in by_shard.items())

    # -- admitting -----------------------------------------------------------------------
    def gate(self, tenant: str, item_id: str, **options: Any) -> GateVerdict:
        shard, part = self.part(tenant)
        verdict = part.gate(tenant, item_id, **options)
        self._tick()
        if verdict.slot is None:
            return verdict
        return dataclasses.replace(verdict, slot=_in_shard(verdict.slot, shard))

    def hint(self, tenant: str, **options: Any) -> Hint:
        return self.part(tenant)[1].hint(tenant, **options)

    def hints(
        self, tenants: Sequence[str], *, queue: str = "default", served_next: bool = False
    ) -> list[Hint]:
        """``FairScheduler.hints``: one round trip per shard that has any of ``tenants``."""
        by_shard: dict[int, list[int]] = {}
        for n, tenant in enumerate(tenants):
            by_shard.setdefault(self.sharded.shard_of(tenant), []).append(n)
        found: dict[int, Hint] = {}
        for shard, positions in by_shard.items():
            got = self.parts[shard].hints(
                [tenants[n] for n in positions], queue=queue, served_next=served_next
            )
            found.update(zip(positions, got, strict=True))
        return [found[n] for n in range(len(tenants))]

    def dispatch(self, queues: Sequence[str], **options: Unpack[DispatchOptions]) -> Dispatch:
        """``FairScheduler.dispatch`` over the shards in turn: the items of the first shard
        (from one further on than the last call) that has any admissible now. With
        ``receipt``, the one call that hands anything over writes it, as unsharded.
        ``held_back``: what every shard asked held back."""
        self._tick()
        n = len(self.parts)
        start, self._turn = self._turn, (self._turn + 1) % n
        waits: list[float] = []
        held_back: tuple[HeldBack, ...] = ()
        for k in range(n):
            shard = (start + k) % n
            got = self.parts[shard].dispatch(queues, **options)
            held_back += got.held_back
            if got.items:
                items = tuple(_item_in_shard(i, shard) for i in got.items)
                return Dispatch(items, 0.0, held_back)
            if got.wait_ms is not None:
                waits.append(got.wait_ms)
        return Dispatch((), min(waits) if waits else None, held_back)

    def dispatch_call(self, queues: Sequence[str], **options: Any) -> tuple[list[str], list[Any]]:
        raise NotImplementedError("a sharded dispatch is one call per shard: use dispatch()")

    @property
    def dispatch_turns(self) -> int:  # type: ignore[override]
        return len(self.parts)

    def dispatch_turn(
        self, queues: Sequence[str], **options: Any
    ) -> tuple[list[str], list[Any], Callable[[object], Dispatch]]:
        """One shard's dispatch call (one further on than the last turn or ``dispatch``),
        and the reader of its reply, whose items name their shard as ``dispatch``'s do."""
        self._tick()
        shard, self._turn = self._turn, (self._turn + 1) % len(self.parts)
        keys, args = self.parts[shard].dispatch_call(queues, **options)

        def read(reply: object) -> Dispatch:
            got = FairScheduler.dispatch_result(reply)
            items = tuple(_item_in_shard(i, shard) for i in got.items)
            return Dispatch(items, got.wait_ms, got.held_back)

        return keys, args, read

    # -- settling --------------------------------------------------------------------------
    def _settle(
        self, item: str | DispatchedItem, how: Callable[[FairScheduler, str | DispatchedItem], bool]
    ) -> bool:
        if isinstance(item, DispatchedItem):
            return how(self.part(item.tenant)[1], item)
        check_item_id(item)
        return any(how(part, item) for part in self.parts)

    def ack(
        self, item: str | DispatchedItem, *, remember: float = 0, keep_slot: bool = False
    ) -> bool:
        return self._settle(item, lambda p, i: p.ack(i, remember=remember, keep_slot=keep_slot))

    def nack(
        self, item: str | DispatchedItem, *, requeue: bool = True, refund: bool = False
    ) -> bool:
        return self._settle(item, lambda p, i: p.nack(i, requeue=requeue, refund=refund))

    def extend(self, item: str | DispatchedItem, lease: float | None = None) -> bool:
        return self._settle(item, lambda p, i: p.extend(i, lease))

    def settle_call(
        self,
        item: str | DispatchedItem,
        how: Literal["ack", "requeue", "drop"],
        remember: float,
        *,
        keep_slot: bool = False,
    ) -> tuple[list[str], list[Any]]:
        if not isinstance(item, DispatchedItem):
            raise NotImplementedError("a sharded settle_call needs the DispatchedItem")
        return self.part(item.tenant)[1].settle_call(item, how, remember, keep_slot=keep_slot)

    def reap(self) -> int:
        return sum(part.reap() for part in self.parts)

    def purge(self, queue: str = "default", *, tenant: str | None = None) -> list[str]:
        """``FairScheduler.purge`` on the tenant's shard, or on every shard."""
        if tenant is not None:
            return self.part(tenant)[1].purge(queue, tenant=tenant)
        return [item for part in self.parts for item in part.purge(queue)]

    # -- reading ---------------------------------------------------------------------------
    def backlog(self, queue: str = "default", tenant: str | None = None) -> int:
        if tenant is not None:
            return self.part(tenant)[1].backlog(queue, tenant)
        return sum(part.backlog(queue) for part in self.parts)

    def counts_key(self, queue: str) -> str:
        return self.parts[0].counts_key(queue)

    def counts_keys(self, queue: str) -> list[str]:
        return [part.counts_key(queue) for part in self.parts]

    def in_flight(self) -> int:
        return sum(part.in_flight() for part in self.parts)

    def lost(self) -> int:
        return sum(part.lost() for part in self.parts)
