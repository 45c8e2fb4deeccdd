"""A worker's INFO summary of throttled work: a line per tenant every few seconds.

Workers park throttled jobs and wait for their budgets without a word otherwise (a
30-second silent gap was seen). Logging each park would flood the log; this summarises:
every ``interval`` seconds in which something was held back, one line per tenant (the
busiest ``max_tenants``), with the jobs parked in that time, the scope that held them back
and the jobs of the tenant waiting in the lane's fair backlog now. The scope comes from
the gate's verdict for work it parks for a budget, and from the dispatch that held the
work back for work parked before any budget was asked (for want of a worker slot).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

if TYPE_CHECKING:
    from ._scheduler import FairScheduler

DEFAULT_INTERVAL = 10.0
MAX_TENANTS = 10
MAX_REMEMBERED = 1000  # tenants whose binding scope a worker's gate report shows

Lane = tuple[str, str]  # (lane, tenant)


def _same_scope(known: str | None, scope: str) -> bool:
    """``known`` names ``scope`` with the window that bound: ``tenant:acme (10000/d)``."""
    return known is not None and known.startswith(scope + " (")


class ThrottleLog:
    """Counts what a worker holds back and says so at INFO, at most once per ``interval``.

    Args:
        logger: where the lines go.
        interval: seconds between summaries (0: never).
        max_tenants: tenants named per summary; the rest are summed in one more line.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL,
        *,
        max_tenants: int = MAX_TENANTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.max_tenants = max_tenants
        self.clock = clock
        self._parked: Counter[Lane] = Counter()
        self._scopes: dict[Lane, str] = {}
        self._bound: dict[Lane, str] = {}  # (not cleared by a summary: see bindings)
        self._waited = False
        self._since = clock()

    def parked(self, lane: str, tenant: str, denied_by: str | None) -> None:
        """A job of ``tenant`` was parked (``denied_by``: the binding scope, with the window
        that bound when it has several, ``GateVerdict.binding``: ``tenant:acme (10000/d)``;
        None: others were queued ahead of it)."""
        self._start()
        key = (lane, tenant)
        self._parked[key] += 1
        self._note(key, denied_by)

    def held_back(self, lane: str, tenant: str, denied_by: str) -> None:
        """A dispatch held back the parked work of ``tenant`` (``denied_by`` as for
        ``parked``; ``HeldBack.binding``): work parked for want of a worker slot, before
        any budget was asked, is held back there, and the summary and ``bindings`` say
        by what as they do for the gate's parks."""
        self.waited()
        self._note((lane, tenant), denied_by)

    def _note(self, key: Lane, denied_by: str | None) -> None:
        """The scope that held the work of ``key`` back (None: others were ahead of it)."""
        # Jobs queued behind the tenant's own first one, held back by a scope, are held
        # back by that scope too: the summary names it rather than the queue. And the
        # gate parks them behind it by its tenant scope alone, without judging the
        # buckets again: that keeps the window a first job named (tenant:acme (10000/d)).
        if denied_by and _same_scope(self._scopes.get(key), denied_by):
            denied_by = self._scopes[key]
        if denied_by or key not in self._scopes:
            self._scopes[key] = denied_by or "queued behind others"
        if denied_by:
            if _same_scope(self._bound.get(key), denied_by):
                return
            if len(self._bound) >= MAX_REMEMBERED and key not in self._bound:
                self._bound.clear()  # (bounded: what the busiest recently met comes back)
            self._bound[key] = denied_by

    def bindings(self) -> dict[str, dict[str, str]]:
        """The scope (and window) that last held each tenant back, by lane and tenant: the
        latest ``MAX_REMEMBERED`` tenants parked or held back at dispatch for a budget,
        whether or not a summary has said so since."""
        out: dict[str, dict[str, str]] = {}
        for (lane, tenant), scope in sorted(self._bound.items()):
            out.setdefault(lane, {})[tenant] = scope
        return out

    def waited(self) -> None:
        """The worker found work waiting that no budget admits yet."""
        self._start()
        self._waited = True

    def _start(self) -> None:
        """A summary's time starts with the first thing it counts."""
        if not self._parked and not self._waited:
            self._since = self.clock()

    def due(self) -> bool:
        return (
            self.interval > 0
            and (bool(self._parked) or self._waited)
            and self.clock() - self._since >= self.interval
        )

    def report(self, scheduler: FairScheduler, lanes: Iterable[str]) -> None:
        """Log the summary if one is due, with each tenant's backlog in ``lanes`` (one
        pipelined read; without it if Redis does not answer)."""
        if not self.due():
            return
        lanes = list(lanes)
        waiting: dict[Lane, int] = {}
        try:
            pipe = scheduler.client.pipeline(transaction=False)
            for lane in lanes:
                pipe.hgetall(scheduler.counts_key(lane))
            for lane, counts in zip(lanes, pipe.execute(), strict=True):
                for field, n in counts.items():
                    tenant = field.decode() if isinstance(field, bytes) else str(field)
                    if not tenant.startswith(":") and int(n) > 0:
                        waiting[(lane, tenant)] = int(n)
        except RedisError:
            waiting = {}
        self.emit(waiting)

    def emit(self, waiting: dict[Lane, int]) -> None:
        """Log one line per tenant held back since the last summary or waiting now."""
        seconds = self.clock() - self._since
        keys = set(self._parked) | set(waiting)
        ranked = sorted(keys, key=lambda k: (-(self._parked[k] + waiting.get(k, 0)), k))
        for lane, tenant in ranked[: self.max_tenants]:
            key = (lane, tenant)
            scope = self._scopes.get(key)
            self.logger.info(
                "queue-ratelimit: throttled: tenant %s on %s: %d parked in the last %.0f s%s, "
                "%d waiting",
                tenant,
                lane,
                self._parked[key],
                seconds,
                f" ({scope})" if scope else "",
                waiting.get(key, 0),
            )
        rest = ranked[self.max_tenants :]
        if rest:
            self.logger.info(
                "queue-ratelimit: throttled: %d more tenant(s): %d parked, %d waiting",
                len(rest),
                sum(self._parked[k] for k in rest),
                sum(waiting.get(k, 0) for k in rest),
            )
        self._parked.clear()
        self._scopes.clear()
        self._waited = False
        self._since = self.clock()
