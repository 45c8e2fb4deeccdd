"""``FairScheduler``: weighted-fair backlogs of work under the token buckets, in Redis."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, Unpack

from redis.exceptions import RedisError, ResponseError

from ._core import check_cost, check_hold, check_positive, redis_errors
from ._decision import Slot
from ._errors import BacklogFull, ConfigError, InvalidName, InvalidWeight
from ._limiter import Limiter
from ._scopes import _shown, check_item_id, check_name, check_priority

log = logging.getLogger("queue_ratelimit")
DEFAULT_PRIORITY_WEIGHTS = {"high": 3.0, "normal": 2.0, "low": 1.0}
# Work of a priority that has no weight is queued under this one (lua/scheduler.lua's route
# and adopt do the same), so a job is never refused, or lost, for its priority's name.
FALLBACK_PRIORITY = "normal"
# Weights divide costs into virtual time (lua/scheduler.lua): a denormal weight made the
# first step infinite and broke the lane. In [1e-3, 1e6] every step (cost / weight) is a
# finite double, and a weight ratio of at most 1e9 stays well inside the 15-16 digits a
# double carries, so the smallest step still moves a pass (docs/tuning.md).
MIN_WEIGHT = 1e-3
MAX_WEIGHT = 1e6
MAX_LEASE = 7 * 86400.0
MAX_DISPATCH = 1000  # items per dispatch call: one reply, one atomic step
PURGE_BATCH = 1000  # items one purge step drops (lua/scheduler.lua "purge"): bounded work
# A lane lets tenants that join go first without moving its fair clock (lua/scheduler.lua
# JUMP_BUDGET, JUMP_REFILL): at most this many in a row, and this many more per item served.
JUMP_BUDGET, JUMP_REFILL = 8, 0.1
MAX_CREDIT = 1_000_000  # admissions one gate call may take ahead (lua/buckets.lua too)
# How long (seconds) a job counted in transit by a hint stays counted beyond twice the wait
# predicted for it, unless a gate sees it sooner (lua/hint.lua; docs/design.md).
TRANSIT_GRACE = 300.0


@dataclass(frozen=True, slots=True)
class DispatchedItem:
    """An item handed to a worker: run it, then ``ack`` (or ``nack``) it.

    ``lease`` identifies this hand-out ("" when no lease was kept). Passing the item itself
    to ``ack``, ``nack`` or ``extend`` presents it: if the lease ran out and the item went
    to another worker, the late call changes nothing of the new holder's.

    ``slot``: the concurrency slots the item took (None when no cap applied). With a lease
    they belong to the in-flight record: ``ack``, ``nack`` and an expired lease release them,
    ``extend`` renews them. Handed over without a lease (``hand_over``), they are held for
    the scheduler's lease length unless given back sooner with ``Limiter.release``.
    """

    id: str
    queue: str
    tenant: str
    priority: str
    cost: float
    payload: bytes
    lease: str = ""
    slot: Slot | None = None


@dataclass(frozen=True, slots=True)
class SubmitItem:
    """One item for ``FairScheduler.submit_many``."""

    tenant: str
    item_id: str
    queue: str = "default"
    priority: str = "normal"
    cost: float = 1
    payload: bytes = b""
    # At the head of its class backlog rather than the tail: a job handed back (its
    # downstream answered 429) keeps its place.
    at_front: bool = False


@dataclass(frozen=True, slots=True)
class Hint:
    """Producer-side backpressure advice for one job: when it would start if enqueued now,
    behind the same tenant's jobs already waiting in its queue. Computed without consuming
    anything (``FairScheduler.hint``).

    Attributes:
        allowed: whether the job would start at once.
        wait_ms: how long until it would start (0 when allowed): until its buckets hold
            the tokens of the jobs ahead of it and its own.
        denied_by: the binding scope, or None.
        backlog: jobs of this tenant waiting ahead of it in the queue: in the fair backlog,
            and enqueued with a hint but not yet seen by a worker (in the broker, on RQ's
            list).
        concurrency: True when ``denied_by`` is a concurrency cap: ``wait_ms`` is then the
            time until its earliest lease runs out, an upper bound (a release comes sooner).
        window: when ``denied_by`` has several windows, the one that binds (``"10000/d"``);
            None otherwise.
    """

    allowed: bool
    wait_ms: float
    denied_by: str | None
    backlog: int
    concurrency: bool = False
    window: str | None = None

    @property
    def binding(self) -> str | None:
        """``denied_by`` with its window, as people read it: ``tenant:acme (10000/d)``."""
        return binding_text(self.denied_by, self.window)

    def as_header(self) -> dict[str, object]:
        """A small JSON-able form, as carried in message headers."""
        header: dict[str, object] = {
            "allowed": self.allowed,
            "wait_ms": round(self.wait_ms, 3),
            "denied_by": self.denied_by,
            "backlog": self.backlog,
        }
        if self.window is not None:
            header["window"] = self.window
        return header


def binding_text(scope: str | None, window: str | None) -> str | None:
    """A binding scope with the window that bound: ``tenant:acme (10000/d)`` (as
    ``Decision.remaining`` names a window), or the scope alone."""
    return scope if scope is None or window is None else f"{scope} ({window})"


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """What ``FairScheduler.gate`` decided for one arriving job.

    Attributes:
        action: ``"run"`` (tokens taken), ``"park"`` (submit it to the backlog) or
            ``"duplicate"`` (already parked, in flight or done: drop this copy).
        wait_ms: for ``"park"``, how long until its buckets would admit it (0 when it waits
            only because others are queued ahead of it).
        denied_by: for ``"park"``, the binding scope, or None when a backlog is the reason.
        credit: for ``"run"``, how many more jobs of the same tenant, lane, priority and cost
            were admitted with this one (tokens already taken; refund what goes unused).
            Always 0 where a concurrency cap applies: each job needs a slot of its own.
        slot: for ``"run"`` under concurrency caps, the slots taken: release them
            (``Limiter.release``) when the job ends; else None.
        concurrency: for ``"park"``, True when ``denied_by`` is a concurrency cap.
        credit_free: the credit took no tokens (no bucket applies): nothing to refund.
        paused: for ``"park"``, True when ``denied_by`` is a paused scope
            (``Limiter.pause``): ``wait_ms`` is the time left of the pause.
        window: for ``"park"``, when ``denied_by`` has several windows, the one that bound
            (``"10000/d"``); None otherwise.
    """

    action: Literal["run", "park", "duplicate"]
    wait_ms: float = 0.0
    denied_by: str | None = None
    credit: int = 0
    slot: Slot | None = None
    concurrency: bool = False
    credit_free: bool = False
    paused: bool = False
    window: str | None = None

    @property
    def binding(self) -> str | None:
        """``denied_by`` with its window, as people read it: ``tenant:acme (10000/d)``."""
        return binding_text(self.denied_by, self.window)


@dataclass(frozen=True, slots=True)
class HeldBack:
    """A tenant whose parked work a dispatch held back, and the scope that did.

    Attributes:
        queue: the lane.
        tenant: the tenant whose next item was judged.
        denied_by: the binding scope: the tenant's own (it is parked until its tokens
            return), a priority scope, or a queue or global scope (the lane waits).
        window: when ``denied_by`` has several windows, the one that bound (``"10000/d"``);
            None otherwise.
        concurrency: ``denied_by`` is a concurrency cap.
        paused: ``denied_by`` is a paused scope.
    """

    queue: str
    tenant: str
    denied_by: str
    window: str | None = None
    concurrency: bool = False
    paused: bool = False

    @property
    def binding(self) -> str:
        """``denied_by`` with its window, as people read it: ``tenant:acme (10000/d)``."""
        return binding_text(self.denied_by, self.window) or self.denied_by

    @classmethod
    def parse(cls, queue: str, tenant: str, text: str) -> HeldBack:
        """One from a binding as scripts name it (lua/buckets.lua ``denied_text``):
        ``tenant:acme(10000/d)``, ``!<cap scope>``, ``~<paused scope>`` or the scope."""
        if text[:1] in ("!", "~"):
            return cls(queue, tenant, text[1:], None, text[0] == "!", text[0] == "~")
        if text.endswith(")"):
            scope, _, window = text[:-1].partition("(")
            return cls(queue, tenant, scope, window)
        return cls(queue, tenant, text)


@dataclass(frozen=True, slots=True)
class Dispatch:
    """The result of ``FairScheduler.dispatch``.

    Attributes:
        items: what was admitted, in fair order (possibly fewer than asked for).
        wait_ms: 0 when something was dispatched or may be now; otherwise how long until the
            earliest item could be admitted; None when every lane asked about is empty.
        held_back: the tenants this call held back and why (the scope and window that
            bound), in the order it judged them: a worker says so where it reports what its
            gate parks (its work may have been parked for want of a worker slot, before
            any budget was asked). A tenant already parked is not judged again until due.
    """

    items: tuple[DispatchedItem, ...]
    wait_ms: float | None
    held_back: tuple[HeldBack, ...] = ()


class DispatchOptions(TypedDict, total=False):
    """The options of ``FairScheduler.dispatch`` and ``dispatch_call``, by keyword."""

    max_items: int
    with_payload: bool
    hand_over: bool
    handoff_lists: Mapping[str, str] | None
    receipt: tuple[str, str] | None


def _held(item: str | DispatchedItem) -> tuple[str, str]:
    """An item id and the lease token to present ("" for a bare id: any holder)."""
    if isinstance(item, DispatchedItem):
        return check_item_id(item.id), item.lease
    return check_item_id(item), ""


def _check_weight(weight: object) -> float:
    try:
        number = check_positive("weight", weight, MAX_WEIGHT, InvalidWeight)
    except InvalidWeight:
        number = math.nan  # one message for every way to miss the range
    if not MIN_WEIGHT <= number <= MAX_WEIGHT:
        raise InvalidWeight(
            f"weight must be a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, got {_shown(weight)}"
        )
    return number


def is_closed(reply: object) -> bool:
    """Whether a settlement's reply (``settle_call``'s script) says the item is closed: 1
    closed now, 2 closed already under the same lease (an ack sent again)."""
    return reply in (1, 2)


def _check_lease(lease: object) -> int:
    """A lease in seconds, as whole milliseconds."""
    return max(1, int(check_positive("lease (seconds)", lease, MAX_LEASE) * 1000))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _hint_result(reply: object) -> Hint:
    """The ``Hint`` a hint.lua reply stands for."""
    starts, wait_ms, denied_by, ahead, by_cap, *window = _text(reply).split(" ")
    return Hint(
        starts == "1",
        float(wait_ms),
        None if denied_by == "-" else denied_by,
        int(ahead),
        by_cap == "1",
        window[0] if window else None,
    )


class FairScheduler:
    """Backlogs per (tenant, priority) in each queue, served in weighted-fair order.

    ``dispatch`` picks the next class by two-level stride scheduling (tenants by tenant
    weight, then priorities inside a tenant by priority weight), consumes the tokens of every
    bucket that applies, and moves the item to an in-flight record with a lease, all in one
    atomic script. Items whose worker dies come back to the head of their backlog when the
    lease runs out; ``ack`` closes the record.

    >>> scheduler = FairScheduler(Limiter.from_url("redis://localhost:6379/0"))
    >>> scheduler.submit("acme", "job-1", queue="emails", priority="high")
    True
    >>> batch = scheduler.dispatch(["emails"], max_items=4)
    >>> for item in batch.items:
    ...     run(item)
    ...     scheduler.ack(item)

    Every method that talks to Redis raises ``BackendUnavailable`` when it is unreachable
    or not serving (an outage), and ``BackendError`` when it answers with an error (broken
    data: never to be taken for an outage), as ``Limiter`` does.

    Args:
        limiter: supplies the Redis client, the namespace and the buckets.
        lease: seconds a dispatched item may stay in flight before it is handed back.
        max_skips: tenants parked (held back by their own caps) per lane in one dispatch
            before it gives up for this call; bounds the cost of a call.
        transit_grace: seconds a job counted by ``hint`` as in transit (enqueued, not yet
            seen by a gate) stays counted beyond twice its predicted wait; a job lost on
            the way (a purged broker queue) stops counting then.
    """

    def __new__(cls, limiter: Limiter, *args: Any, **options: Any) -> FairScheduler:
        if getattr(limiter, "shards", 1) != 1 and cls is FairScheduler:
            # Lanes per shard (docs/design.md, "Shards").
            from ._sharded_scheduler import ShardedScheduler  # (a subclass of this)

            return super().__new__(ShardedScheduler)
        return super().__new__(cls)

    def __init__(
        self,
        limiter: Limiter,
        *,
        lease: float = 60.0,
        max_skips: int = 32,
        transit_grace: float = TRANSIT_GRACE,
    ) -> None:
        self.limiter = limiter
        self.client = limiter.client
        self._core = limiter._core
        self.lease_ms = _check_lease(lease)
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise ConfigError(f"max_skips must be a whole number >= 0, got {_shown(max_skips)}")
        self.max_skips = max_skips
        self.transit_grace_ms = int(
            check_positive("transit_grace", transit_grace, MAX_LEASE) * 1000
        )
        self._scripts = limiter._scripts
        self._unweighted: set[str] = set()  # priorities already warned about
        self.keys = k = self._core.keys
        # lua/scheduler.lua: these keys first (then the mode's own), and after the mode and
        # the counter retention, the prefixes of the keys it names from user parts.
        self._keys = [k.config, k.shared, k.inflight, k.lease, k.meta, k.payload, k.lanes]
        self._prefixes = list(k.scheduler_prefixes)
        # The gate's keys of a lane (active, parked), named once per lane.
        self._lane_keys: dict[str, tuple[str, str]] = {}
        self._scripts.before_first_call(self._legacy_check)

    def _legacy_check(self) -> None:
        """Warn about work that a version with the older scheduler key layout left."""
        try:
            left = int(self.client.hlen(self.keys.legacy_meta))
        except RedisError:
            return
        if left:
            log.warning(
                "queue-ratelimit: %d item(s) parked or in flight in the scheduler key layout "
                "of queue-ratelimit 0.1 (%s); this version does not serve them: let a 0.1 "
                "worker drain them (see 'Upgrading' in docs/tuning.md)",
                left,
                self.keys.legacy_meta,
            )

    def _args(self, mode: str, args: Sequence[str | int | float | bytes]) -> list[Any]:
        return [mode, self._core.retention_ms, *self._prefixes, *args]

    def _run(
        self,
        mode: str,
        *args: str | int | float | bytes,
        client: Any = None,
        keys: Sequence[str] = (),
    ) -> object:
        all_keys = [*self._keys, *keys]
        args_ = self._args(mode, args)
        if client is None:
            with redis_errors():
                return self._scripts.call("scheduler.lua", all_keys, args_)
        self._scripts.queue_on_callers_pipeline(client, "scheduler.lua", all_keys, args_)
        return client

    def _pipelined(self, fill: Callable[[Any], None]) -> list[Any]:
        """Run the script calls ``fill`` queues on a pipeline, in one round trip (again,
        once, if the server had lost the scripts)."""
        with redis_errors():
            for attempt in (1, 2):
                pipe = self.client.pipeline(transaction=False)
                fill(pipe)
                try:
                    replies: list[Any] = pipe.execute()
                    return replies
                except ResponseError as exc:
                    if attempt == 2 or not self._scripts.recover(exc):
                        raise
        raise AssertionError("unreachable")  # (the loop returns or raises)

    def _unweighted_priority(self, priority: str) -> str:
        """The fallback for a priority without a weight, warned about once per name."""
        if priority not in self._unweighted and len(self._unweighted) < 1000:
            self._unweighted.add(priority)
            log.warning(
                "queue-ratelimit: priority %s has no weight: its work is queued as %r (use "
                "high, normal or low, or give it a weight with set_priority_weight)",
                _shown(priority),
                FALLBACK_PRIORITY,
            )
        return FALLBACK_PRIORITY

    def submit(
        self,
        tenant: str,
        item_id: str,
        *,
        queue: str = "default",
        priority: str = "normal",
        cost: float = 1,
        payload: bytes = b"",
        max_backlog: int = 0,
        pipeline: Any = None,
        at_front: bool = False,
    ) -> Any:
        """Add an item to the tail of its class backlog (the head with ``at_front``). False
        if the id is already known (queued, in flight, or remembered as done by
        ``ack(remember=...)``), which makes a redelivered submit harmless. A priority that
        has no weight (not high, normal or low, nor given one with ``set_priority_weight``)
        and no limit or pause of its own (``priority:<p>``) is queued as ``normal``, with a
        warning logged: the item is never refused for it. (One with a limit or pause but no
        weight keeps its name, with weight 1, so that its scope holds its waiting work.)

        Args:
            max_backlog: when > 0, refuse the item if the queue's backlog already holds
                that many items (all tenants together).
            pipeline: queue the call on this pipeline instead (its reply comes with the
                pipeline's: 1 queued, 0 duplicate, -2 unknown priority, -3 backlog full).

        Raises:
            InvalidName: malformed names.
            BacklogFull: ``max_backlog`` reached; nothing was stored.
            BackendUnavailable: Redis is unreachable (the item may or may not be stored:
                submit it again, which is harmless).
            BackendError: Redis answered with an error (broken data in it).
        """
        item = SubmitItem(tenant, item_id, queue, priority, cost, payload, at_front)
        keys, args = self._submit_call(item, max_backlog)
        if pipeline is not None:
            self._scripts.queue_on_callers_pipeline(pipeline, "scheduler.lua", keys, args)
            return pipeline
        with redis_errors():
            reply = self._scripts.call("scheduler.lua", keys, args)
        if reply == -2:  # no weight: nothing was stored
            return self.submit(
                tenant,
                item_id,
                queue=queue,
                priority=self._unweighted_priority(priority),
                cost=cost,
                payload=payload,
                max_backlog=max_backlog,
                at_front=at_front,
            )
        if reply == -3:
            raise BacklogFull(queue, max_backlog)
        return reply == 1

    def _submit_call(self, item: SubmitItem, max_backlog: int) -> tuple[list[str], list[Any]]:
        if isinstance(max_backlog, bool) or not isinstance(max_backlog, int) or max_backlog < 0:
            raise ConfigError(f"max_backlog must be a whole number >= 0, got {_shown(max_backlog)}")
        args: list[str | int | float | bytes] = [
            check_name("queue", item.queue),
            check_name("tenant", item.tenant),
            check_priority(item.priority),
            check_item_id(item.item_id),
            repr(check_cost(item.cost)),
            item.payload,
            max_backlog,
        ]
        if item.at_front:
            args.append("1")
        return [*self._keys, self.keys.done(item.item_id)], self._args("submit", args)

    def submit_many(
        self, items: Sequence[SubmitItem], *, max_backlog: int = 0
    ) -> list[Literal["queued", "duplicate", "full"]]:
        """``submit`` for several items in one round trip (each its own atomic step, in
        order): what became of each.

        Raises:
            InvalidName / InvalidCost: a malformed item (nothing is sent).
            BackendUnavailable / BackendError: as for ``submit``; items before the failing
                one may be stored (submitting them again is harmless).
        """
        calls = self.submit_calls(items, max_backlog=max_backlog)
        if not calls:
            return []

        def fill(pipe: Any) -> None:
            for keys, args in calls:
                self._scripts.queue(pipe, "scheduler.lua", keys, args)

        return self.submit_outcomes(items, self._pipelined(fill), max_backlog=max_backlog)

    def submit_calls(
        self, items: Sequence[SubmitItem], *, max_backlog: int = 0
    ) -> list[tuple[list[str], list[Any]]]:
        """The keys and arguments of the calls ``submit_many`` makes, one per item, for
        callers that send them themselves (see ``command``); read the replies with
        ``submit_outcomes``.

        Raises:
            InvalidName / InvalidCost: a malformed item.
        """
        return [self._submit_call(i, max_backlog) for i in items]

    def submit_outcomes(
        self, items: Sequence[SubmitItem], replies: Sequence[object], *, max_backlog: int = 0
    ) -> list[Literal["queued", "duplicate", "full"]]:
        """What became of each item, from the replies to its ``submit_calls``. An item
        refused for a priority without a weight (nothing was stored) is submitted again,
        now, under the fallback priority (see ``submit``).

        Raises:
            BackendUnavailable / BackendError: as for ``submit``, from such a resubmission.
        """
        outcomes: list[Literal["queued", "duplicate", "full"]] = []
        for item, reply in zip(items, replies, strict=True):
            code = reply
            if code == -2:
                try:
                    queued = self.submit(
                        item.tenant,
                        item.item_id,
                        queue=item.queue,
                        priority=self._unweighted_priority(item.priority),
                        cost=item.cost,
                        payload=item.payload,
                        max_backlog=max_backlog,
                        at_front=item.at_front,
                    )
                except BacklogFull:
                    code = -3
                else:
                    code = 1 if queued else 0
            outcomes.append("queued" if code == 1 else "full" if code == -3 else "duplicate")
        return outcomes

    def command(self, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
        """The raw ``FCALL`` of one call (from ``submit_calls``, ``dispatch_call`` or
        ``settle_call``), for callers that send it on a connection of their own.
        Only while the Functions transport is in use (``scripts.transport == "fcall"``)."""
        function = self._scripts.functions["scheduler.lua"]
        return ("FCALL", function, len(keys), *keys, *args)

    def settle_call(
        self,
        item: str | DispatchedItem,
        how: Literal["ack", "requeue", "drop"],
        remember: float,
        *,
        keep_slot: bool = False,
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of the scheduler call that ``ack`` (``"ack"``) or ``nack``
        (``"requeue"``, ``"drop"``) would make, for callers that send it themselves."""
        item_id, token = _held(item)
        if how == "ack":
            done_ms = int(remember * 1000) if remember > 0 else 0
            slot = "1" if keep_slot else "0"
            return [*self._keys, self.keys.done(item_id)], self._args(
                "ack", [item_id, "0", "0", done_ms, token, slot]
            )
        requeue = "1" if how == "requeue" else "0"
        return self._keys, self._args("nack", [item_id, requeue, "0", 0, token])

    def dispatch(self, queues: Sequence[str], **options: Unpack[DispatchOptions]) -> Dispatch:
        """Admit up to ``max_items`` items from ``queues`` (earlier queues first), fairly.

        Options (``DispatchOptions``; the defaults are ``dispatch_call``'s):
            max_items: at most this many items (1 to 1000; default 1).
            with_payload: return each item's payload (default True).
            hand_over: keep no in-flight record (no lease, no ``ack``): for callers whose
                own bookkeeping takes over in the same step, via ``handoff_lists``.
            handoff_lists: queue -> Redis list that each dispatched id is pushed onto, in
                the same atomic step (e.g. RQ's intermediate queue).
            receipt: (key, nonce): when anything is dispatched, the key (in this namespace's
                hash slot; see ``receipt_key``) is set to ``"<nonce> <id>..."`` for a day in the
                same step, so a caller that lost the reply can learn what it was handed.
        """
        keys, args = self.dispatch_call(queues, **options)
        with redis_errors():
            reply = self._scripts.call("scheduler.lua", keys, args)
        return self.dispatch_result(reply)

    def dispatch_call(
        self,
        queues: Sequence[str],
        *,
        max_items: int = 1,
        with_payload: bool = True,
        hand_over: bool = False,
        handoff_lists: Mapping[str, str] | None = None,
        receipt: tuple[str, str] | None = None,
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of a ``dispatch`` (same options, ``DispatchOptions``), for
        callers that send it themselves (see ``command``); read the reply with
        ``dispatch_result``."""
        if isinstance(queues, str):
            queues = [queues]
        for q in queues:
            check_name("queue", q)
        if not queues:
            raise InvalidName("dispatch needs at least one queue")
        if not 1 <= max_items <= MAX_DISPATCH:
            raise InvalidName(f"max_items must be 1 to {MAX_DISPATCH}, got {max_items}")
        lists = handoff_lists or {}
        args = self._args(
            "dispatch",
            [
                max_items,
                f"0 {self.lease_ms}" if hand_over else self.lease_ms,
                self.max_skips,
                "1" if with_payload else "0",
                "" if receipt is None else receipt[1],
                *(f"{q}|{lists[q]}" if q in lists else q for q in queues),
            ],
        )
        return [*self._keys, *([] if receipt is None else [receipt[0]])], args

    # A sender of its own (the Celery gate's wire) dispatches in turns: one call per turn,
    # read by the turn's own reader; a sharded scheduler takes one shard per turn, and a
    # turn that finds nothing is followed by the next, up to ``dispatch_turns`` of them.
    dispatch_turns = 1

    def dispatch_turn(
        self, queues: Sequence[str], **options: Any
    ) -> tuple[list[str], list[Any], Callable[[object], Dispatch]]:
        """The next turn's ``dispatch_call`` (same parameters) and its reply's reader."""
        keys, args = self.dispatch_call(queues, **options)
        return keys, args, self.dispatch_result

    @staticmethod
    def dispatch_result(reply: object) -> Dispatch:
        """The ``Dispatch`` a dispatch call's reply stands for."""
        assert isinstance(reply, list)
        # "<wait ms>", then " <lane> <tenant> <binding>" per tenant held back.
        wait, *why = _text(reply[0]).split(" ")
        head = float(wait)
        items = tuple(
            DispatchedItem(
                id=_text(i[0]),
                queue=_text(i[1]),
                tenant=_text(i[2]),
                priority=_text(i[3]),
                cost=float(_text(i[4])),
                payload=i[5] if isinstance(i[5], bytes) else str(i[5]).encode(),
                lease=_text(i[6]),
                slot=Slot.parse(i[7]) if len(i) > 7 and i[7] else None,
            )
            for i in reply[1:]
        )
        held_back = tuple(
            HeldBack.parse(why[n], why[n + 1], why[n + 2]) for n in range(0, len(why) - 2, 3)
        )
        return Dispatch(items=items, wait_ms=None if head < 0 else head, held_back=held_back)

    def receipt_key(self, owner: str) -> str:
        """A key for ``dispatch(receipt=...)`` receipts of one caller (e.g. one process)."""
        return self.keys.receipt(owner)

    def ack(
        self, item: str | DispatchedItem, *, remember: float = 0, keep_slot: bool = False
    ) -> bool:
        """Close an in-flight record after the work ran. False if it was not in flight, or
        (given the ``DispatchedItem``) no longer under this hand-out's lease. True also for
        an item this hand-out's lease closed already (with ``remember``): an ack sent again
        because the reply to the first was lost.

        With ``remember`` (seconds), ``gate`` treats the id as a duplicate for that long, so
        a broker redelivery of work that already ran through the backlog is not run again.
        With ``keep_slot``, the item's concurrency slots stay held (for work acknowledged
        when it starts): renew them with ``Limiter.extend_slot(item.slot)`` while it runs
        and give them back with ``Limiter.release(item.slot)``; they run out with the
        lease the dispatch gave them otherwise.
        """
        keys, args = self.settle_call(item, "ack", remember, keep_slot=keep_slot)
        with redis_errors():
            return is_closed(self._scripts.call("scheduler.lua", keys, args))

    def hint(
        self,
        tenant: str,
        *,
        queue: str = "default",
        priority: str = "normal",
        cost: float = 1,
        item_id: str | None = None,
        count: Literal["always", "if_allowed"] = "always",
    ) -> Hint:
        """When a job enqueued now would start: its buckets, and the same tenant's jobs
        ahead of it in the queue (in the fair backlog and in transit), in one round trip.

        Args:
            item_id: the id the job will arrive at a gate with: it is counted as in
                transit (ahead of the tenant's next jobs) until a gate sees it, or until
                twice its predicted wait plus ``transit_grace`` have passed. None: count
                nothing (a producer whose jobs reach the queue counted otherwise, e.g.
                ``route``).
            count: ``"if_allowed"`` counts the job only when it would start at once (a
                producer that refuses the others); ``"always"`` counts it whatever.

        Raises:
            ConfigError: ``count`` is neither (a misspelt ``"if_allowed"`` counted every
                job, refused ones too: each stood in the tenant's way until it lapsed,
                twice its predicted wait later).
        """
        keys, args = self._hint_call(tenant, queue, priority, cost, item_id, count)
        with redis_errors():
            return _hint_result(self._scripts.call("hint.lua", keys, args))

    def hints(
        self, tenants: Sequence[str], *, queue: str = "default", served_next: bool = False
    ) -> list[Hint]:
        """``hint`` for the next job (priority ``normal``, cost 1, counted nowhere) of each
        of ``tenants`` in one queue, in one round trip: what holds each one's work back now
        (``Hint.binding``).

        Args:
            served_next: judge instead the job the dispatch would serve next from each
                tenant's backlog in the queue (e.g. for ``queue-ratelimit rq info``): of
                the tenant's backlogged priorities, the one it serves first (lowest pass;
                one its priority scope holds back is passed over, as the dispatch does),
                at the cost of that class's oldest item, with nothing ahead of it
                (``Hint.backlog`` 0). A tenant with nothing in the backlog is judged as
                a job of priority ``normal`` and cost 1. Counts nothing in transit.
        """
        if served_next:
            prefix = self.keys.scheduler_prefixes.backlog
            k = self.keys
            calls = []
            for t in tenants:
                keys, args = self._hint_call(t, queue, "normal", 1, None, "always")
                calls.append(
                    ([*keys, k.classes(queue, t), k.meta], [*args, f"{prefix}{queue}:{t}:"])
                )
        else:
            calls = [self._hint_call(t, queue, "normal", 1, None, "always") for t in tenants]
        if not calls:
            return []

        def fill(pipe: Any) -> None:
            for keys, args in calls:
                self._scripts.queue(pipe, "hint.lua", keys, args)

        return [_hint_result(reply) for reply in self._pipelined(fill)]

    def _hint_call(
        self,
        tenant: str,
        queue: str,
        priority: str,
        cost: float,
        item_id: str | None,
        count: Literal["always", "if_allowed"],
    ) -> tuple[list[str], list[Any]]:
        if count not in ("always", "if_allowed"):
            raise ConfigError(f"count must be 'always' or 'if_allowed', got {_shown(count)}")
        args = [
            check_name("queue", queue),
            check_name("tenant", tenant),
            check_priority(priority),
            repr(check_cost(cost)),
            "" if item_id is None else check_item_id(item_id),
            "0" if item_id is None else "2" if count == "if_allowed" else "1",
            self.transit_grace_ms,
        ]
        k = self.keys
        keys = [
            k.config,
            k.shared,
            k.tenant(tenant),
            k.counts(queue),
            k.active(queue),
            k.transit(queue, tenant),
        ]
        return keys, args

    def route(
        self,
        tenant: str,
        item_id: str,
        list_key: str,
        *,
        queue: str = "default",
        priority: str = "normal",
        cost: float = 1,
        at_front: bool = False,
        pipeline: Any = None,
        wait_ms: float = 0.0,
    ) -> Any:
        """Producer side: push ``item_id`` onto the plain list ``list_key`` when its queue is
        uncontended (the worker's gate admits it there), else into the fair backlog.

        An item pushed onto the list is counted as in transit (see ``hint``) for twice
        ``wait_ms`` (the wait its hint predicted) plus ``transit_grace``, unless a gate or
        ``adopt`` sees it sooner. With ``pipeline`` the call is queued on it (and its reply
        comes with the pipeline's); otherwise it returns True when the item joined the
        backlog.
        """
        reply = self._run(
            "route",
            check_name("queue", queue),
            check_name("tenant", tenant),
            check_priority(priority),
            check_item_id(item_id),
            repr(check_cost(cost)),
            list_key,
            "1" if at_front else "0",
            int(2 * max(0.0, wait_ms)) + self.transit_grace_ms,
            client=pipeline,
        )
        return reply if pipeline is not None else reply == 1

    def adopt(
        self,
        queue: str,
        list_key: str,
        jobs: Sequence[tuple[str, str | None, str, float]],
    ) -> int:
        """Move items waiting on a plain list (a queue system's own, e.g. RQ's) into the
        queue's fair backlog, oldest first, in one atomic step.

        Args:
            jobs: (item id, tenant, priority, cost) per item, in list order; a tenant of
                None only takes the id off the list (its job no longer exists).

        Returns:
            How many items joined the backlog. Ids no longer on the list (taken meanwhile)
            are skipped; ids the scheduler already holds are only taken off the list.
        """
        check_name("queue", queue)
        args: list[str] = []
        for item_id, tenant, priority, cost in jobs:
            args += [
                check_item_id(item_id),
                "" if tenant is None else check_name("tenant", tenant),
                check_priority(priority),
                repr(check_cost(cost)),
            ]
        if not args:
            return 0
        reply = self._run("adopt", queue, list_key, *args)
        assert isinstance(reply, int)
        return reply

    def gate(
        self,
        tenant: str,
        item_id: str,
        *,
        queue: str = "default",
        priority: str = "normal",
        cost: float = 1,
        credit: int = 0,
        hold: float | None = None,
    ) -> GateVerdict:
        """The worker fast path: admit work arriving from a broker now, or say it must wait.

        Work runs at once only when its lane has no fair backlog (it would overtake queued
        work otherwise) and every bucket admits it; a ``"park"`` verdict means: ``submit`` it
        with its payload, then acknowledge it to the broker. ``"duplicate"`` means the id is
        already parked, in flight, or remembered as done by ``ack(remember=...)``.

        With ``credit`` the call may also admit up to that many more jobs like this one, but
        only while every bucket stays at least half full (nothing is contended then); the
        verdict says how many, and the caller refunds the unused ones (``Limiter.refund``).

        Under concurrency caps a ``"run"`` verdict carries the slots taken (``slot``), held
        ``hold`` seconds (default: the scheduler's lease) unless released sooner with
        ``Limiter.release(verdict.slot)``; no credit is granted then.
        """
        if isinstance(credit, bool) or not isinstance(credit, int) or not 0 <= credit <= MAX_CREDIT:
            raise ConfigError(
                f"credit must be a whole number in [0, {MAX_CREDIT}], got {_shown(credit)}"
            )
        check_name("tenant", tenant)
        check_name("queue", queue)
        check_priority(priority)
        amount = check_cost(cost)
        k = self.keys
        lane_keys = self._lane_keys.get(queue)
        if lane_keys is None:
            if len(self._lane_keys) >= 1024:
                self._lane_keys.clear()
            lane_keys = self._lane_keys[queue] = (k.active(queue), k.parked(queue))
        with redis_errors():
            reply = self._scripts.call(
                "gate.lua",
                [
                    k.config,
                    k.shared,
                    k.meta,
                    *lane_keys,
                    k.tenant(tenant),
                    k.done(item_id),
                    k.transit(queue, tenant),
                ],
                [
                    self._core.retention_ms,
                    queue,
                    tenant,
                    priority,
                    item_id,
                    repr(amount),
                    credit,
                    self.lease_ms if hold is None else check_hold(hold),
                ],
            )
        assert isinstance(reply, list)
        code = int(reply[0])
        if code == 1:
            slot = _text(reply[2]) if len(reply) > 2 else ""
            return GateVerdict(
                "run",
                credit=int(reply[1]) if len(reply) > 1 else 0,
                slot=Slot.parse(slot) if slot else None,
                credit_free=len(reply) > 3 and _text(reply[3]) == "1",
            )
        if code == 2:
            return GateVerdict("duplicate")
        flag = _text(reply[3]) if len(reply) > 3 else "0"
        return GateVerdict(
            "park",
            float(_text(reply[1])),
            _text(reply[2]) or None,
            concurrency=flag == "1",
            paused=flag == "2",
            window=_text(reply[4]) if len(reply) > 4 else None,
        )

    def nack(
        self, item: str | DispatchedItem, *, requeue: bool = True, refund: bool = False
    ) -> bool:
        """Close an in-flight record without running the work: back to the head of its
        backlog (``requeue``) or dropped, with its tokens returned if ``refund``. False as
        for ``ack``."""
        item_id, token = _held(item)
        flags = ("1" if requeue else "0", "1" if refund else "0")
        return self._run("nack", item_id, *flags, 0, token) == 1

    def extend(self, item: str | DispatchedItem, lease: float | None = None) -> bool:
        """Renew an item's lease (for work that runs longer than the lease). False as for
        ``ack``."""
        item_id, token = _held(item)
        lease_ms = self.lease_ms if lease is None else _check_lease(lease)
        return self._run("extend", item_id, lease_ms, token) == 1

    def reap(self) -> int:
        """Hand back items whose lease expired (dispatch also does this as it goes)."""
        reply = self._run("reap")
        assert isinstance(reply, int)
        return reply

    def purge(self, queue: str = "default", *, tenant: str | None = None) -> list[str]:
        """Drop the items waiting in a queue's backlog (of one tenant, or of all): they will
        never be dispatched. Items in flight (dispatched, not yet acked) are left alone.

        Runs in steps of at most ``PURGE_BATCH`` items, each atomic, until nothing is left;
        items submitted meanwhile may go too. Every count and index stays true, and a queue
        left empty is forgotten (as one drained by ``dispatch`` is). The payloads go with
        the items; work kept elsewhere under these ids (RQ's job records) is the caller's
        to delete (``queue_ratelimit.rq.Queue.empty`` does).

        Returns:
            The ids dropped, oldest first within each backlog.
        """
        lane = check_name("queue", queue)
        who = "" if tenant is None else check_name("tenant", tenant)
        dropped: list[str] = []
        while True:
            reply = self._run("purge", lane, who, PURGE_BATCH)
            assert isinstance(reply, list)
            dropped += [_text(i) for i in reply[1:]]
            if _text(reply[0]) != "1":
                return dropped

    def set_tenant_weight(self, tenant: str, weight: float | None, *, actor: str = "api") -> int:
        """A tenant's share of contended budgets (default 1; ``"*"`` sets the default)."""
        name = tenant if tenant == "*" else check_name("tenant", tenant)
        return self._set_weight(f"weight:tenant:{name}", weight, actor)

    def set_priority_weight(
        self, priority: str, weight: float | None, *, actor: str = "api"
    ) -> int:
        """A priority's share inside each tenant (defaults: high 3, normal 2, low 1)."""
        return self._set_weight(f"weight:priority:{check_priority(priority)}", weight, actor)

    def _set_weight(self, field: str, weight: float | None, actor: str) -> int:
        if weight is None:
            call = self._core.config_call("del", field, "", actor)
        else:
            call = self._core.config_call("set", field, repr(_check_weight(weight)), actor)
        return self.limiter._run_config(call, must_exist=weight is None)

    def weights(self) -> dict[str, float]:
        """Configured weights by config field (``weight:tenant:<t>``, ``weight:priority:<p>``)."""
        with redis_errors():
            raw = self.client.hgetall(self._core.keys.config)
        return {
            _text(f): float(_text(v))
            for f, v in sorted(raw.items())
            if _text(f).startswith("weight:")
        }

    def backlog(self, queue: str = "default", tenant: str | None = None) -> int:
        """Items waiting in a queue's backlogs (of one tenant, or of all)."""
        field = ":total" if tenant is None else check_name("tenant", tenant)
        with redis_errors():
            return int(self.client.hget(self.counts_key(queue), field) or 0)

    def counts_key(self, queue: str) -> str:
        """The hash of a queue's backlog sizes: field ``:total``, and one per tenant."""
        return self.keys.counts(queue)

    def counts_keys(self, queue: str) -> list[str]:
        """Every hash of a queue's backlog sizes (one per shard of a sharded namespace)."""
        return [self.counts_key(queue)]

    def in_flight(self) -> int:
        """Items dispatched and not yet acked or handed back."""
        with redis_errors():
            return int(self.client.zcard(self.keys.inflight))

    def lost(self) -> int:
        """Items the scheduler found without their record or payload, and dropped: a Redis
        that evicts keys (maxmemory-policy ``allkeys-*``/``volatile-*``) lost them. Counted
        in the shared hash (field ``n:lost``), so it starts over if that is evicted too."""
        with redis_errors():
            return int(float(self.client.hget(self.keys.shared, "n:lost") or 0))
