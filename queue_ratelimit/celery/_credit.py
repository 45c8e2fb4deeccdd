"""The credit ledger: admissions a worker took in advance while nothing was contended.

One gate call may admit several jobs of the same tenant, queue, priority and cost at once
(``FairScheduler.gate(credit=...)``): their tokens are taken then, and the worker spends
them on the next such jobs without a round trip. Credit lives ``ttl`` seconds; what is left
then is refunded, so unused admissions never hold tokens for long.

A job admitted on credit passes no gate call, which is where a job a producer's hint
counted as in transit stops counting (lua/gate.lua): the ledger takes those jobs off the
transit count itself, by id: on the gate's wire as they are admitted (written with the event
loop's other calls, never waited for), else in one round trip per ``ttl``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from .._errors import RateLimitError
from .._limiter import Limiter
from .._shard_layout import tenant_keys

if TYPE_CHECKING:
    from ._cluster_wire import AnyWire
    from ._wire import Reply

log = logging.getLogger("queue_ratelimit.celery")

CreditKey = tuple[str, str, str, float]  # (tenant, lane, priority, cost)


class CreditLedger:
    """Per worker: admissions held in advance, by (tenant, lane, priority, cost).

    Args:
        limiter: where unused credit is refunded.
        timer: the consumer's timer (``call_after``).
        ttl: seconds a grant lives before its rest is refunded.
    """

    def __init__(self, limiter: Callable[[], Limiter], timer: Callable[[], Any], ttl: float):
        self._limiter = limiter
        self._timer = timer
        self.ttl = ttl
        # key -> [units left, valid until, refund what is left]
        self._entries: dict[CreditKey, list[Any]] = {}
        self._expiry: Any = None
        # (lane, tenant) -> ids of the jobs admitted on credit since the last flush.
        self._spent: dict[tuple[str, str], list[str]] = {}
        # The gate's wire while it is in use (set by the gate), and transit keys by
        # (lane, tenant).
        self.wire: Callable[[], AnyWire | None] = lambda: None
        self._transit_keys: dict[tuple[str, str], str] = {}

    def spend(self, key: CreditKey, item_id: str = "") -> bool:
        """Take one admission for ``key`` if one is held; True when it was. ``item_id``:
        the job it admits, taken off the transit count at the next flush."""
        entry = self._entries.get(key)
        if entry is None or entry[0] <= 0 or entry[1] < time.monotonic():
            return False
        entry[0] -= 1
        if item_id:
            wire = self.wire()
            if wire is None:
                self._spent.setdefault((key[1], key[0]), []).append(item_id)
            else:
                wire.send([("ZREM", self._transit_key(key[1], key[0]), item_id)], _ignored)
        return True

    def _transit_key(self, lane: str, tenant: str) -> str:
        found = self._transit_keys.get((lane, tenant))
        if found is None:
            if len(self._transit_keys) >= 10_000:
                self._transit_keys.clear()
            # (On a sharded namespace, the tenant's shard holds its transit count.)
            keys = tenant_keys(self._limiter(), tenant)
            found = self._transit_keys[(lane, tenant)] = keys.transit(lane, tenant)
        return found

    def grant(self, key: CreditKey, units: int, *, free: bool = False) -> None:
        """Hold ``units`` more admissions for ``key`` (what was left of an older grant is
        refunded: the new one starts its own lifetime). ``free``: they took no tokens (no
        bucket applied), so none are given back."""
        left = self._entries.pop(key, None)
        if left is not None and left[0] > 0 and left[2]:
            self._refund(key, left[0])
        self._entries[key] = [units, time.monotonic() + self.ttl, not free]
        if self._expiry is None:
            self._expiry = self._timer().call_after(self.ttl, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        self.flush()
        now = time.monotonic()
        for key, (units, until, refund) in list(self._entries.items()):
            if until <= now:
                del self._entries[key]
                if units > 0 and refund:
                    self._refund(key, units)
        if self._entries:
            self._expiry = self._timer().call_after(self.ttl, self._expire)

    def close(self) -> None:
        """Refund everything held (the consumer is stopping)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.flush()
        for key, (units, _, refund) in list(self._entries.items()):
            if units > 0 and refund:
                self._refund(key, units)
        self._entries.clear()

    def flush(self) -> None:
        """Take the jobs admitted on credit off their tenants' transit counts (one round
        trip). Redis unreachable: they stay counted until their entries lapse."""
        spent, self._spent = self._spent, {}
        if not spent:
            return
        pipe = self._limiter().client.pipeline(transaction=False)
        for (lane, tenant), ids in spent.items():
            pipe.zrem(self._transit_key(lane, tenant), *ids)
        try:
            pipe.execute()
        except RedisError as exc:
            jobs = sum(len(ids) for ids in spent.values())
            log.warning("queue-ratelimit: %s; %d job(s) stay counted as in transit", exc, jobs)

    def _refund(self, key: CreditKey, units: int) -> None:
        tenant, lane, priority, cost = key
        try:
            self._limiter().refund(tenant, queue=lane, priority=priority, cost=units * cost)
        except RateLimitError as exc:
            # Unused tokens stay spent: the caps only get stricter, never looser.
            log.warning("queue-ratelimit: could not refund %d unused credit: %s", units, exc)


def _ignored(_: list[Reply] | RedisError) -> None:
    """A transit entry taken off or not: nothing depends on it (a lost one lapses)."""
