"""Worker side: the consumer bootstep that gates every task message before the pool.

A message whose buckets admit it (and whose queue has no fair backlog to respect) runs at
once, while the worker has a free slot. Any other is parked in the fair scheduler's Redis
backlog *before* it is acknowledged to the broker, so it never holds a prefetch slot and is
never lost: work the buckets hold back, and (``fair_capacity``) work that arrives while the
pool is saturated. Workers re-admit parked work in the scheduler's weighted-fair order,
across all hosts, as their slots free (``PoolSlots``) and their budgets allow.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from celery import bootsteps
from celery.exceptions import InvalidTaskError
from celery.utils.time import maybe_iso8601
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.serialization import prepare_accept_content
from kombu.utils.functional import maybe_list
from redis.exceptions import RedisError, ResponseError
from vine import promise

from .._breaker import refused
from .._durability import persistence_warning
from .._errors import RateLimitError
from .._scheduler import Dispatch, DispatchedItem, GateVerdict, SubmitItem
from .._scopes import _shown, check_name
from .._slot_keeper import SlotKeeper
from .._throttle_log import ThrottleLog
from ._broker_ack import ack_all, is_plain_ack
from ._cluster_wire import make_wire
from ._credit import CreditKey, CreditLedger
from ._health import MAX_REST, REDIS_FAILURES, GateHealth, RedisHealth
from ._identity import (
    FLAGGED_REDELIVERY_TRANSPORTS,
    STABLE_TAG_TRANSPORTS,
    backlog_id,
    item_id_of,
    task_fields,
)
from ._lane import gate_lane
from ._options import HEADER_FRONT, HEADER_NONCE, HeaderOptions, RateOptions, gated
from ._parking import BacklogChannel, decode_message, encode_message, from_backlog
from ._runtime import Runtime, runtime_of
from ._settler import AsyncSettler, Settlement
from ._slots import PoolSlots, Wakeup
from ._wire import NotSent, Reply

log = logging.getLogger("queue_ratelimit.celery")
Strategy = Callable[..., Any]
# Re-admit at most this many jobs per dispatch call (one round trip each batch).
DISPATCH_BATCH = 16
# Messages that must wait are parked in batches: one round trip for up to this many, sent
# at the latest this long (seconds) after the first of them arrived.
PARK_BATCH = 32
PARK_DELAY = 0.005


class Job:
    """A task message as the gate sees it."""

    __slots__ = ("exact", "item_id", "lane", "options")

    def __init__(self, item_id: str, lane: str, options: RateOptions, exact: bool = True) -> None:
        self.item_id = item_id
        self.lane = lane
        self.options = options
        # Whether the id names the publish (a nonce or a stable delivery tag), so that a
        # copy of it can only be a redelivery (see _identity).
        self.exact = exact

    @property
    def credit_key(self) -> CreditKey:
        o = self.options
        return (o.tenant, self.lane, o.priority, o.cost)


class Delivery:
    """One broker message in the gate's hands, with what can be done with it."""

    __slots__ = (
        "ack",
        "acked_as_usual",
        "counted",
        "in_doubt",
        "job",
        "message",
        "run",
    )

    def __init__(
        self,
        job: Job,
        message: Any,
        run: Callable[[], Any],
        ack: Callable[[], Any],
        acked_as_usual: bool = False,
    ) -> None:
        self.job = job
        self.message = message
        self.run = run
        self.ack = ack
        # ``ack`` is the message's own ack and nothing more: several may go at once.
        self.acked_as_usual = acked_as_usual
        # A park of it was lost with its connection: it may be in the backlog already, so
        # only Redis may decide it (never credit, never the fail mode).
        self.in_doubt = False
        # The prefetch count is raised by one for it while it waits here (``_count``).
        self.counted = False


class RateLimitGate(bootsteps.StartStopStep):
    """Consumer step: wraps the task strategies so that every message passes the gate."""

    label = "queue-ratelimit gate"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.runtime: Runtime | None = runtime_of(c.app)
        self.enabled = self.runtime is not None
        self.consumer = c
        self.originals: dict[str, Strategy] = {}
        # Re-admitted jobs by item id: their lease fences the ack, nack or renewal.
        self.held: dict[str, DispatchedItem] = {}
        # In-flight records that could not be closed because Redis was unreachable; they
        # are closed first thing when it is back, before their leases can run out (the
        # lease must outlast the outage, or another worker takes the job over again).
        self.unsettled: dict[str, Settlement] = {}
        # Broker messages kept unacknowledged for now: Redis is unreachable (closed fail
        # mode) or the backlog is full. Bounded by max_held; tried again on every tick.
        self.waiting: list[Delivery] = []
        # Messages on their way into the backlog (the next batch), with the shortest wait
        # their buckets gave; acknowledged to the broker once the batch is in Redis.
        self.parking: list[Delivery] = []
        self._parking_wait = float("inf")
        self._park_timer: Any = None
        # Items asked for by a dispatch whose reply has not come yet (on the wire).
        self._dispatching = 0
        self.stats = {
            "admitted": 0,
            "admitted_on_credit": 0,
            "parked": 0,
            "parked_for_slots": 0,
            "readmitted": 0,
            "duplicates": 0,
            "failed_open": 0,
            "dispatch_calls": 0,
            "park_calls": 0,
        }
        self.lanes: list[str] = []
        self.accept: Any = None
        self.channel = BacklogChannel(self._on_backlog_ack, self._on_backlog_reject)
        # Whether the fair backlog may hold work for this worker: a finished job then asks
        # for more at once; otherwise the poll finds what other workers parked.
        self.backlog_seen = True
        self._wakeup = Wakeup(lambda: self.consumer.timer, self._readmit)
        self._renew_timer: Any = None
        # Whether Redis answers, is out (the fail mode decides) or is broken (work is held):
        # one view per primary of a cluster, one in all on one server.
        self.health = GateHealth(
            lambda: RedisHealth(
                self.runtime.settings.fail_mode if self.runtime else "open",
                on_back=self._redis_back if self.runtime else None,
                max_rest=self.runtime.settings.lease / 6 if self.runtime else MAX_REST,
            ),
            self.runtime.limiter if self.runtime else None,
        )
        self._durability_checked = False
        # What the broker's messages tell about redeliveries (set in start, see _identity).
        self._stable_tags = False
        self._flagged_redeliveries = False
        if self.runtime is not None:
            settings = self.runtime.settings
            self.header_options = HeaderOptions(settings)
            self.credit = CreditLedger(
                lambda: self._rt.limiter, lambda: self.consumer.timer, settings.credit_ttl
            )
            self.slots = PoolSlots(c, settings.reserve, self._slot_freed)
            self.slots.watch()
            # Scheduler calls whose replies the event loop reads when they come.
            self.wire = make_wire(self.runtime.scheduler.client, getattr(c, "hub", None))
            self.settler = AsyncSettler(self.runtime.scheduler, self.wire, self._on_settled)
            self.credit.wire = lambda: self.wire if self._on_wire() else None
            self.throttled = ThrottleLog(log, settings.log_interval)
            # Concurrency slots of the jobs this worker runs, by backlog item id.
            self.running = SlotKeeper(lambda: self._rt.limiter, settings.lease)
            # Strategies capture this method when they are built (in Tasks.start), so ETA
            # tasks are gated when they fall due rather than when they arrive.
            self._apply_eta_task = c.apply_eta_task
            c.apply_eta_task = self._gated_apply_eta_task

    @property
    def _rt(self) -> Runtime:
        assert self.runtime is not None
        return self.runtime

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, c: Any) -> None:
        settings = self._rt.settings
        # A restarted consumer has a reset event loop, which no longer watches the wire:
        # what was sent on it before is in doubt (handled as such) and a new one connects.
        self.wire.close()
        self.wire.attach(getattr(c, "hub", None))
        self.lanes = self._lanes(c)
        driver = getattr(getattr(c.connection, "transport", None), "driver_type", None)
        self._stable_tags = driver in STABLE_TAG_TRANSPORTS
        self._flagged_redeliveries = driver in FLAGGED_REDELIVERY_TRANSPORTS
        self.accept = prepare_accept_content(c.app.conf.accept_content)
        self.slots.watch()  # a pool replaced since __init__ (the consumer restarted)
        for name, strategy in list(c.strategies.items()):
            if getattr(strategy, "__queue_ratelimit__", False):
                continue
            self.originals[name] = strategy
            c.strategies[name] = self._wrap(name, strategy)
        self._look_for_caps()
        self._schedule(0.0)
        self._renew_timer = c.timer.call_repeatedly(
            max(settings.lease / 3, 0.1), self._renew_leases
        )
        log.info(
            "queue-ratelimit gate on queues %s (namespace %s, fair capacity %s)",
            ", ".join(self.lanes),
            settings.namespace,
            "on" if settings.fair_capacity else "off",
        )
        if not self._durability_checked:
            self._durability_checked = True
            warning = persistence_warning(self._rt.limiter.client)
            if warning:
                log.warning("queue-ratelimit: %s", warning)
            # The eviction policy (settings.eviction: warn, or refuse to start) and work
            # left by an older key layout, now rather than at the first script call.
            # Another shard count recorded for the namespace (or Redis away) leaves the
            # check pending: every call meets it and the gate holds the work meanwhile.
            try:
                self._rt.limiter._scripts.run_checks()
            except REDIS_FAILURES as exc:
                self.health.home.failed(exc, time.monotonic())

    def stop(self, c: Any) -> None:
        self._wakeup.cancel()
        if self._renew_timer is not None:
            self._renew_timer.cancel()
            self._renew_timer = None
        self._flush_parking()
        self._drain_wire()
        self.wire.close()
        self.wire.detach()
        self.credit.close()

    def info(self, c: Any) -> dict[str, Any]:
        """Shown by ``celery inspect stats``."""
        return {
            "queue_ratelimit": {
                **self.stats,
                "held": len(self.held),
                "unsettled": len(self.unsettled),
                "waiting": len(self.waiting),
                "redis_writes": self.wire.writes,
                "lanes": self.lanes,
            }
        }

    # -- helpers -------------------------------------------------------------------------
    def _lanes(self, c: Any) -> list[str]:
        lanes = []
        for queue in maybe_list(getattr(c.task_consumer, "queues", None)) or []:
            try:
                lanes.append(check_name("queue", queue.name))
            except RateLimitError as exc:
                log.error("queue-ratelimit: queue %r cannot be gated: %s", queue.name, exc)
        return lanes or [c.app.conf.task_default_queue]

    @property
    def _max_held(self) -> int:
        return self._rt.settings.max_held or self.slots.reserve

    def _capacity(self) -> int:
        """How many re-admitted jobs this worker may take now."""
        return max(0, min(self._max_held - len(self.held), self.slots.free()))

    def _job(self, message: Any) -> Job | None:
        """The gate's view of a message; None for tasks that are not gated."""
        headers = task_fields(message)
        name = headers.get("task")
        task = self.consumer.app.tasks.get(name) if isinstance(name, str) else None
        if task is None or not gated(task):
            return None
        item_id, exact = backlog_id(headers, message.delivery_tag if self._stable_tags else None)
        try:
            options = self.header_options(headers)
        except RateLimitError as exc:
            # Another producer's headers (any type, any size): run it with the defaults.
            log.error("queue-ratelimit: %s in message %s; using defaults", exc, item_id)
            options = self.header_options({})
        # (Also written into the message's headers: the task pauses what the gate used.)
        lane = gate_lane(message, self.lanes, getattr(self.consumer, "task_consumer", None))
        return Job(item_id, lane, options, exact)

    def _item_id(self, message: Any) -> str:
        """The backlog id of a message the pool ran (as ``_job`` gave it)."""
        if from_backlog(message):
            return str(message.delivery_tag)
        tag = message.delivery_tag if self._stable_tags else None
        return item_id_of(task_fields(message), tag)

    def _verdict(self, job: Job) -> GateVerdict | None:
        """Ask Redis; None when it failed (the tenant's ``health`` says how)."""
        o = job.options
        health = self.health.of_tenant(o.tenant)
        if health.resting():
            return None
        started = time.monotonic()
        try:
            verdict = self._rt.scheduler.gate(
                o.tenant,
                job.item_id,
                queue=job.lane,
                priority=o.priority,
                cost=o.cost,
                credit=self._rt.settings.credit,
            )
        except REDIS_FAILURES as exc:
            health.failed(exc, started)
            return None
        health.ok()
        return verdict

    def _park(self, d: Delivery, wait_ms: float) -> None:
        """Queue the message for the next batch into the backlog (see ``_flush_parking``).

        Until the batch's reply says where it is, it stays unacknowledged, and the prefetch
        count is raised by one for it (``_count``): a park that hangs with Redis does not
        stop the broker delivering new work (which meets the fail mode).
        """
        self.parking.append(d)
        self._parking_wait = min(self._parking_wait, wait_ms)
        self._count(d)
        if len(self.parking) >= PARK_BATCH:
            self._flush_parking()
        elif self._park_timer is None:
            self._park_timer = self.consumer.timer.call_after(PARK_DELAY, self._flush_parking)

    def _flush_parking(self) -> None:
        """Submit the queued messages to the backlog in one round trip, then acknowledge to
        the broker each one that is safely in Redis (publish before ack)."""
        if self._park_timer is not None:
            self._park_timer.cancel()
            self._park_timer = None
        batch, self.parking = self.parking, []
        wait_ms, self._parking_wait = self._parking_wait, float("inf")
        if not batch:
            return
        items = [
            SubmitItem(
                d.job.options.tenant,
                d.job.item_id,
                queue=d.job.lane,
                priority=d.job.options.priority,
                cost=d.job.options.cost,
                payload=encode_message(d.message),
                at_front=(d.message.headers or {}).get(HEADER_FRONT) == "1",
            )
            for d in batch
        ]
        # (On a cluster, each primary's part on its own: one resting is not asked.)
        by_health: dict[RedisHealth, list[int]] = {}
        for n, d in enumerate(batch):
            by_health.setdefault(self.health.of_tenant(d.job.options.tenant), []).append(n)
        for health, group in by_health.items():
            self._park_part(health, [batch[n] for n in group], [items[n] for n in group], wait_ms)

    def _park_part(
        self, health: RedisHealth, batch: list[Delivery], items: list[SubmitItem], wait_ms: float
    ) -> None:
        """Submit the part of a batch whose shards live where ``health`` looks."""
        scheduler, bound = self._rt.scheduler, self._rt.settings.max_backlog
        if health.resting():  # Redis failed a moment ago: the fail mode decides
            self._park_failed(batch, health)
            return
        self.stats["park_calls"] += 1
        started = time.monotonic()
        if self._on_wire():
            calls = scheduler.submit_calls(items, max_backlog=bound)
            # (On a cluster, one send per slot: a primary down fails its own part only.)
            for group in self.wire.groups([keys for keys, _ in calls]):
                self._park_on_wire(health, batch, items, calls, group, wait_ms, started)
            return
        try:
            outcomes = scheduler.submit_many(items, max_backlog=bound)
        except REDIS_FAILURES as exc:
            self._park_failed(batch, health, exc, started, in_doubt=not refused(exc, NotSent))
            return
        health.ok()
        self._apply_parked(batch, outcomes, wait_ms)

    def _park_on_wire(
        self,
        health: RedisHealth,
        batch: list[Delivery],
        items: list[SubmitItem],
        calls: list[tuple[list[str], list[Any]]],
        group: list[int],
        wait_ms: float,
        started: float,
    ) -> None:
        """Send the park of ``batch[i]`` for each ``i`` in ``group`` (one send)."""
        part, part_items = [batch[i] for i in group], [items[i] for i in group]

        def parked(result: list[Reply] | RedisError) -> None:
            self._parked(health, part, part_items, wait_ms, result, started)

        command = self._rt.scheduler.command
        self.wire.send([command(*calls[i]) for i in group], parked)

    def _park_failed(
        self,
        batch: list[Delivery],
        health: RedisHealth,
        exc: BaseException | None = None,
        started: float = 0.0,
        in_doubt: bool = False,
    ) -> None:
        """A batch could not be parked (``exc``: the failure of the call begun at
        ``started``; None: not tried, Redis failed a moment ago). ``in_doubt``: the call
        may have run, so each message may be in the backlog already: kept until Redis
        answers (it then tells a duplicate), whatever the fail mode; otherwise the fail mode
        decides."""
        if exc is not None:
            health.failed(exc, started)
        for d in batch:
            self._uncount(d)
            d.in_doubt = d.in_doubt or in_doubt
            self._unreachable(d)

    def _parked(
        self,
        health: RedisHealth,
        batch: list[Delivery],
        items: list[SubmitItem],
        wait_ms: float,
        result: list[Reply] | RedisError,
        started: float,
    ) -> None:
        """The replies to a batch sent on the wire at ``started``."""
        if isinstance(result, RedisError):
            # NotSent: Redis unreachable, the fail mode decides. Else lost with the
            # connection after it was written: whether each went in is unknown. Kept, each
            # is tried again once Redis answers; one that did go in is then recognised as
            # a duplicate.
            self._park_failed(
                batch, health, result, started, in_doubt=not isinstance(result, NotSent)
            )
            return
        scheduler, bound = self._rt.scheduler, self._rt.settings.max_backlog
        try:
            if any(isinstance(reply, ResponseError) for reply in result):
                # The server refused the calls (its functions flushed, or broken data): the
                # ordinary way loads them again, or says what is broken; what did go in
                # comes back as a duplicate.
                outcomes = scheduler.submit_many(items, max_backlog=bound)
            else:
                outcomes = scheduler.submit_outcomes(items, result, max_backlog=bound)
        except REDIS_FAILURES as exc:
            self._park_failed(batch, health, exc, started, in_doubt=True)
            return
        health.ok()
        self._apply_parked(batch, outcomes, wait_ms)

    def _apply_parked(self, batch: list[Delivery], outcomes: Sequence[str], wait_ms: float) -> None:
        """Acknowledge to the broker each message that is safely in Redis (publish before
        ack); keep the ones the backlog had no room for."""
        plain_acks = []
        for d, outcome in zip(batch, outcomes, strict=True):
            self._uncount(d)
            if outcome == "queued":
                self.stats["parked"] += 1
                if d.acked_as_usual:
                    plain_acks.append(d.message)
                else:
                    d.ack()
            elif outcome == "duplicate":
                self._drop_duplicate(d)
            else:
                self._keep(d)
        errors = self.consumer.connection_errors
        ack_all(plain_acks, lambda m: m.ack_log_error(log, errors), errors)
        if "queued" in outcomes:
            self.backlog_seen = True
            # Parked for want of a slot: the next job to end asks for work (_slot_freed).
            if wait_ms > 0 or self.slots.free() >= self.slots.refill:
                self._schedule(wait_ms / 1000)

    def _on_wire(self) -> bool:
        """Whether calls go on the wire, their replies read by the event loop (Celery's
        hub, and a server with Functions); else they are waited for."""
        return self.wire.hub is not None and self.settler.usable

    # -- the gate ------------------------------------------------------------------------
    def _wrap(self, name: str, strategy: Strategy) -> Strategy:
        def gated_strategy(
            message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any
        ) -> Any:
            if from_backlog(message):
                return strategy(message, body, ack, reject, callbacks, **kw)
            job = self._job(message)
            if job is None or _due_later(message):
                return strategy(message, body, ack, reject, callbacks, **kw)
            return self._decide(
                Delivery(
                    job,
                    message,
                    run=lambda: strategy(message, body, ack, reject, callbacks, **kw),
                    ack=lambda: ack(log, self.consumer.connection_errors),
                    acked_as_usual=is_plain_ack(ack, message),
                )
            )

        gated_strategy.__queue_ratelimit__ = True  # type: ignore[attr-defined]
        return gated_strategy

    def _gated_apply_eta_task(self, request: Any) -> Any:
        message = request.message
        job = None if from_backlog(message) else self._job(message)
        if job is None:
            return self._apply_eta_task(request)

        def acknowledge() -> None:
            request.acknowledge()
            self.consumer.qos.decrement_eventually()

        return self._decide(
            Delivery(
                job,
                message,
                run=lambda: self._apply_eta_task(request),
                ack=acknowledge,
            )
        )

    def _decide(self, d: Delivery) -> Any:
        settings = self._rt.settings
        # Jobs asked of the backlog count as taken: while their reply is on its way, a
        # message from the broker must not slip into the slots they will fill (FIFO
        # order would overtake the fair order).
        if settings.fair_capacity and self.slots.saturated(self._dispatching):
            # Every slot is taken: wait in the fair backlog, where whichever worker frees
            # a slot first serves it in weighted-fair order, rather than FIFO here.
            self.stats["parked_for_slots"] += 1
            return self._wait(d, 0.0)
        redelivered = _redelivered(d.message)
        # A redelivered message always asks Redis: only Redis can tell whether it already
        # ran through the backlog. So does a task handed back by a pause (pause_and_retry,
        # strict_pauses): credit taken before the pause would run it again at once, into
        # the downstream that just said 429, up to `credit` times in a row.
        handed_back = (d.message.headers or {}).get(HEADER_FRONT) == "1"
        if not (redelivered or d.in_doubt or handed_back) and self.credit.spend(
            d.job.credit_key, d.job.item_id
        ):
            self.stats["admitted"] += 1
            self.stats["admitted_on_credit"] += 1
            return d.run()
        verdict = self._verdict(d.job)
        if verdict is None:
            return self._unreachable(d)
        if verdict.action == "run":
            self.stats["admitted"] += 1
            if verdict.credit:
                self.credit.grant(d.job.credit_key, verdict.credit, free=verdict.credit_free)
            self.running.keep(d.job.item_id, verdict.slot)
            return d.run()
        if verdict.action == "duplicate":
            return self._drop_duplicate(d)
        self.backlog_seen = True
        self.throttled.parked(d.job.lane, d.job.options.tenant, verdict.binding)
        return self._wait(d, verdict.wait_ms)

    def _wait(self, d: Delivery, wait_ms: float) -> Any:
        """Park the message in the backlog, then acknowledge it to the broker."""
        self._park(d, wait_ms)
        return None

    def _drop_duplicate(self, d: Delivery) -> Any:
        if (
            not d.job.exact
            and self._flagged_redeliveries
            and not _redelivered(d.message)
            and not d.in_doubt  # (the copy the lost park put in the backlog)
        ):
            # The id is known but the broker never delivered this message before: a new
            # message that reuses a task id, from a producer without the plugin (no nonce).
            # It gets a nonce of its own, in its headers so that every later look at the
            # message (slot release, the backlog copy) finds the same id.
            nonce = uuid.uuid4().hex
            d.message.headers[HEADER_NONCE] = nonce
            d.job.item_id, d.job.exact = f"{d.job.item_id}.{nonce}", True
            return self._decide(d)
        # Already parked, in flight, or run through the backlog: this is a broker
        # redelivery of a message we took over; acknowledging it loses nothing.
        self.stats["duplicates"] += 1
        log.warning("queue-ratelimit: dropping duplicate delivery of %s", d.job.item_id)
        return d.ack()

    def _unreachable(self, d: Delivery) -> Any:
        """Redis failed: the fail mode decides an outage. Held whatever the fail mode:
        work while Redis answers errors (broken data, wrong credentials), which never runs
        unchecked; and a message that may be in the backlog already (a park in doubt, a
        broker redelivery), which only Redis can tell from a new one (run now, it could
        run again from the backlog)."""
        health = self.health.of_tenant(d.job.options.tenant)
        if health.broken or d.in_doubt or _redelivered(d.message):
            return self._keep(d, health)
        self._rt.limiter._core.count_fail_mode(self._rt.settings.fail_mode)
        if self._rt.settings.fail_mode == "open":
            self.stats["failed_open"] += 1
            return d.run()
        return self._keep(d, health)

    def _keep(self, d: Delivery, out: RedisHealth | None = None) -> Any:
        """Hold the message unacknowledged and try again on the next tick (``out``: the
        health of its primary, which failed; None: kept for a full backlog).

        Up to max_held kept messages raise the prefetch count while they wait, so that new
        work keeps coming: one held only until Redis can say whether it is in the backlog
        already (in doubt, a redelivery), and on a cluster one held for its own primary
        while another answers (the fail mode, or broken data there): else one stopped
        primary's tenants' messages could fill the window, and the live primaries' tenants
        would get no work until it is back. Any other (one server, every primary out, a
        full backlog) does not raise it: new work would only be held too, and the broker
        keeps the rest. So what is held stays bounded by the prefetch window plus max_held.

        (Past max_held a message used to be handed back to the broker, which delivered it
        again at once: with the window raised, that was a loop between the gate and the
        broker for as long as the outage lasted, 97,845 hand-backs in one run.)"""
        vet = d.in_doubt or _redelivered(d.message)
        partial = out is not None and self.health.answers_besides(out)
        if (vet or partial) and self._counted() < self._max_held:
            self._count(d)
        self.waiting.append(d)
        return None

    def _counted(self) -> int:
        return sum(1 for w in self.waiting if w.counted)

    def _count(self, d: Delivery) -> None:
        """Raise the prefetch count by one while ``d`` waits in the gate (as Celery does
        for a message it holds for a later ETA), so the broker keeps delivering."""
        if not d.counted:
            d.counted = True
            self.consumer.qos.increment_eventually()

    def _uncount(self, d: Delivery) -> None:
        if d.counted:
            d.counted = False
            self.consumer.qos.decrement_eventually()

    def _retry_waiting(self, blocked: set[RedisHealth]) -> None:
        """Give the messages kept back another try, oldest first, while Redis answers
        (on a cluster: while their shard's primary does)."""
        waiting, self.waiting = self.waiting, []
        down = set(blocked)
        for d in waiting:
            health = self.health.of_tenant(d.job.options.tenant)
            if health in down:
                self.waiting.append(d)
                continue
            self._uncount(d)
            self._decide(d)
            if health.down_since is not None:
                down.add(health)

    # -- re-admission ----------------------------------------------------------------------
    def _slot_freed(self, request: Any) -> None:
        """A job ended (on whichever thread the pool reports it): give back its concurrency
        slot, and feed the pool slot at once if the backlog may hold work."""
        if len(self.running) and request is not None:
            message = getattr(request, "message", None)
            if message is not None:
                self.running.release(self._item_id(message))
        if (self.backlog_seen or self.waiting) and self.slots.free() >= self.slots.refill:
            self._schedule(0.0)

    def _schedule(self, delay: float) -> None:
        """Run ``_readmit`` after ``delay`` seconds (sooner if already due sooner)."""
        delay = min(max(delay, 0.0), self._rt.settings.poll_interval)
        self._wakeup.at(time.monotonic() + delay, delay)

    def _readmit(self) -> None:
        poll = self._rt.settings.poll_interval
        self._check_wire()
        # What an outage left open is closed before anything new is taken (on a cluster:
        # from the primary it lives on). A Redis that failed a moment ago is let rest.
        blocked = self._settle_pending() if self.unsettled else set()
        if self.health.everywhere(lambda h: h in blocked or h.resting()):
            self._schedule(poll)  # Redis is still unreachable: nothing to dispatch either
            return
        delay = self._dispatch(blocked)
        if self.waiting:
            self._retry_waiting(blocked)
        self.throttled.report(self._rt.scheduler, self.lanes)
        # While a dispatch is on the wire its reply schedules what comes next; this is a
        # watchdog in case it never comes.
        self._schedule(poll if delay is None else delay)

    def _dispatch(self, blocked: set[RedisHealth]) -> float | None:
        """Ask the backlog for as many jobs as the worker may take now (not where
        ``blocked``: settlements are left there): the delay until the next look, or None
        when the reply will come on the wire."""
        if self._dispatching:
            return None  # one at a time: its reply knows what it brought
        free = self._capacity()
        if free == 0:
            return min(self._rt.settings.poll_interval, 0.05)
        scheduler = self._rt.scheduler
        want = min(free, DISPATCH_BATCH)
        self.stats["dispatch_calls"] += 1
        if self._on_wire():
            self._dispatching = want
            self._dispatch_on_wire(want, scheduler.dispatch_turns, [], set(blocked))
            return None
        if self.health.one.resting():
            return self._rt.settings.poll_interval
        return self._dispatch_now(want)

    def _dispatch_on_wire(
        self, want: int, turns: int, waits: list[float], skip: set[RedisHealth]
    ) -> None:
        """Send the scheduler's next dispatch turn on the wire; its reply hands the jobs to
        the pool. A turn that found nothing is followed by the next while ``turns`` last
        (a sharded namespace: one shard per turn), from the reply, without a poll; so is a
        turn that failed, or is not sent because its primary rests or is in ``skip`` (on
        a cluster the other primaries' shards go on; on one server every turn is then
        skipped)."""
        scheduler = self._rt.scheduler
        keys, args, read = scheduler.dispatch_turn(self.lanes, max_items=want)
        health = self.health.of_key(keys[0])
        poll = self._rt.settings.poll_interval

        def missed() -> None:
            """This turn brought nothing and said no wait: the next, or the end."""
            skip.add(health)
            if turns > 1:
                self._dispatch_on_wire(want, turns - 1, waits, skip)
                return
            self._dispatching = 0
            self._schedule(min([poll, *(w / 1000 for w in waits)]))

        if health in skip or health.resting():
            missed()
            return
        started = time.monotonic()

        def dispatched(result: list[Reply] | RedisError) -> None:
            reply = result if isinstance(result, RedisError) else result[0]
            if isinstance(reply, ResponseError):
                # Functions flushed (the ordinary way reloads them), or broken data (the
                # ordinary way says so).
                self._dispatching = 0
                delay = self._dispatch_now(want, health)
            elif isinstance(reply, RedisError):
                health.failed(reply, started)
                missed()
                return
            else:
                health.ok()
                batch = read(reply)
                self._heard(batch)
                if not batch.items and turns > 1:
                    if batch.wait_ms is not None:
                        waits.append(batch.wait_ms)
                    self._dispatch_on_wire(want, turns - 1, waits, skip)
                    return
                if not batch.items and waits:
                    wait = min([*waits, *([] if batch.wait_ms is None else [batch.wait_ms])])
                    batch = Dispatch((), wait)
                self._dispatching = 0
                delay = self._dispatched(batch, want)
            self._schedule(delay)

        self.wire.send([scheduler.command(keys, args)], dispatched)

    def _dispatch_now(self, want: int, health: RedisHealth | None = None) -> float:
        """``_dispatch`` waiting for the reply (a failure rests ``health``: by default the
        one server's; a sharded dispatch goes over every shard, so on a cluster it cannot
        tell which primary failed)."""
        health = health or self.health.one
        started = time.monotonic()
        try:
            batch = self._rt.scheduler.dispatch(self.lanes, max_items=want)
        except REDIS_FAILURES as exc:
            health.failed(exc, started)
            return self._rt.settings.poll_interval
        health.ok()
        self._heard(batch)
        return self._dispatched(batch, want)

    def _heard(self, batch: Dispatch) -> None:
        """Note what a dispatch held back and why, where the gate's own parks are noted
        (the throttling summary, ``held_back_by``): work parked for want of a slot meets
        its budget only there."""
        for held in batch.held_back:
            self.throttled.held_back(held.queue, held.tenant, held.binding)

    def _dispatched(self, batch: Dispatch, want: int) -> float:
        """Hand the dispatched jobs to the pool; the delay until the next look."""
        self.backlog_seen = bool(batch.items) or batch.wait_ms is not None
        for item in batch.items:
            self._deliver(item)
        if len(batch.items) == want:
            return 0.0
        if batch.wait_ms is not None:
            if batch.wait_ms > 0:
                self.throttled.waited()
            return batch.wait_ms / 1000
        return self._rt.settings.poll_interval

    def _check_wire(self) -> None:
        """Read what has come in on the wire, and drop a connection whose replies are
        overdue (``Wire.drop_if_hung``: 10 s, or the client's socket timeout if longer): a
        hung Redis, or a connection that died without a word, must not stall the gate (a
        dispatch waiting on it stops re-admission)."""
        if self.wire.hub is not None:
            self.wire.flush()  # what the socket refused earlier, if the loop has been idle
        stalled = self.wire.drop_if_hung()
        if stalled:
            log.error(
                "queue-ratelimit: no reply from Redis for %.1fs (the limit is %gs); "
                "dropping the connection",
                stalled,
                self.wire.stall_limit,
            )

    def _drain_wire(self) -> None:
        """Wait for every reply still due (the worker is stopping)."""
        try:
            self.wire.drain()
        except RedisError:
            self.wire.close()

    def _deliver(self, item: DispatchedItem) -> None:
        c = self.consumer
        item_id = item.id
        self.held[item_id] = item
        self.running.keep(item_id, item.slot)
        try:
            message = decode_message(item.payload, item_id, self.channel, accept=self.accept)
        except Exception as exc:  # whatever the payload: never stop the consumer
            # Not a message this gate parked: no payload (an RQ queue of the same name in
            # this namespace) or one another client wrote. Raising here left the item held
            # (its lease renewed for ever) and the rest of its batch undelivered.
            log.error(
                "queue-ratelimit: discarding parked item %s: not a message a gate parked (%r)",
                _shown(item_id),
                exc,
            )
            self._settle(item_id, "drop")
            return
        name = task_fields(message).get("task")
        strategy = self.originals.get(name) if isinstance(name, str) else None
        if strategy is None:
            log.error("queue-ratelimit: no task %r on this worker; handing %s back", name, item_id)
            self._settle(item_id, "requeue")
            return
        self.stats["readmitted"] += 1
        try:
            strategy(
                message,
                None,
                promise(c.call_soon, (message.ack_log_error,)),
                promise(c.call_soon, (message.reject_log_error,)),
                c.on_task_message,
            )
        except (InvalidTaskError, ContentDisallowed, DecodeError) as exc:
            # Celery discards such a message when it comes from the broker; so do we,
            # loudly, rather than handing it back to fail again forever.
            log.error("queue-ratelimit: discarding invalid parked message %s: %r", item_id, exc)
            self._settle(item_id, "drop")

    def _on_backlog_ack(self, item_id: str) -> None:
        self._settle(item_id, "ack")

    def _on_backlog_reject(self, item_id: str, requeue: bool) -> None:
        # Celery discards a rejected message; so do we (remembered as done, like an ack).
        if requeue:
            self.running.forget(item_id)  # the requeue gives its slots back with it
        if self._settle(item_id, "requeue" if requeue else "ack") and requeue:
            self._schedule(0.0)

    def _settle(self, item_id: str, how: Settlement) -> bool:
        """Close a re-admitted job's in-flight record. False when Redis is unreachable:
        the job stays held and is settled as soon as Redis is back.

        Celery acks and rejects from its event loop, where an exception would stop the
        worker (RabbitMQ) or be logged and forgotten (Redis broker), leaving the record
        open until its lease runs out and the job is handed out again: a duplicate.
        """
        scheduler = self._rt.scheduler
        item = self.held.get(item_id, item_id)
        # A job acknowledged as it starts keeps its concurrency slots until it ends.
        keep_slot = how == "ack" and isinstance(item, DispatchedItem) and item.slot is not None
        health = self._health_of(item)
        if health.resting():  # settled when Redis is back
            self.unsettled[item_id] = how
            return False
        if item_id not in self.unsettled and self.settler.sendable(item):
            self.held.pop(item_id, None)
            self.settler.send(item, how, self._rt.settings.dedupe_window, keep_slot)
            return True
        started = time.monotonic()
        try:
            if how == "ack":
                closed = scheduler.ack(
                    item, remember=self._rt.settings.dedupe_window, keep_slot=keep_slot
                )
            else:
                closed = scheduler.nack(item, requeue=how == "requeue")
        except REDIS_FAILURES as exc:
            health.failed(exc, started)
            self.unsettled[item_id] = how
            return False
        health.ok()
        self.unsettled.pop(item_id, None)
        self.held.pop(item_id, None)
        if not closed:
            _lease_ran_out(item_id, how)
        return True

    def _on_settled(
        self, item_id: str, item: DispatchedItem | str, how: Settlement, closed: bool | None
    ) -> None:
        """The answer to a settlement sent on the wire. One in doubt is settled again the
        ordinary way (``unsettled``), before anything new is dispatched."""
        if closed is None:
            if isinstance(item, DispatchedItem):
                self.held[item_id] = item
            self.unsettled[item_id] = how
            self._schedule(0.0)
        elif not closed:
            _lease_ran_out(item_id, how)

    def _settle_pending(self) -> set[RedisHealth]:
        """Settle what an outage left open: the healths of the primaries where some is
        left (after a failure there, the rest there is not tried; empty: all settled)."""
        left: set[RedisHealth] = set()
        for item_id, how in list(self.unsettled.items()):
            health = self._health_of(self.held.get(item_id, item_id))
            if health not in left and not self._settle(item_id, how):
                left.add(health)
        return left

    def _health_of(self, item: DispatchedItem | str) -> RedisHealth:
        """The health of the primary a settlement of ``item`` goes to (a bare id: asked
        of every shard in turn, judged by the home slot's)."""
        if isinstance(item, DispatchedItem):
            return self.health.of_tenant(item.tenant)
        return self.health.home

    def _look_for_caps(self) -> None:
        """Whether concurrency caps are configured: a worker then takes on no more jobs
        than it has processes (a job queued here would hold a cap's slot idle)."""
        # Redis unreachable: keep what was known; the next renewal looks again.
        if self.health.home.resting():
            return
        with contextlib.suppress(*REDIS_FAILURES, RateLimitError):
            self.slots.capped = bool(self._rt.limiter.concurrency())

    def _redis_back(self) -> None:
        """Redis answers again after failures: what the fail mode decided meanwhile goes
        into the namespace's counters, and the leases are renewed (and what the outage
        left unsettled settled) now rather than at the next tick: leases that ran out
        during the outage are kept for their holders for one lease after it, no longer."""
        self._rt.limiter.report_fail_mode()
        self.consumer.timer.call_after(0.0, self._renew_leases)

    def _renew_leases(self) -> None:
        """Keep the leases of re-admitted jobs that are still waiting or running alive, and
        the concurrency slots of running jobs."""
        self._look_for_caps()
        if self.health.everywhere(RedisHealth.resting):  # (renewed at the next tick after)
            return
        if len(self.running):
            from celery.worker.state import requests

            self.running.release_ended(
                self._item_id(r.message)
                for r in list(requests.values())
                if getattr(r, "message", None) is not None
            )
            self.running.renew(self.health.of_slot)
        # Where settlements are left, or a call fails, the rest waits (on a cluster: the
        # rest of that primary's; the others go on).
        blocked = self._settle_pending() if self.unsettled else set()
        for item_id, item in list(self.held.items()):
            health = self.health.of_tenant(item.tenant)
            if health in blocked or health.resting():
                continue
            started = time.monotonic()
            try:
                if not self._rt.scheduler.extend(item):
                    self.held.pop(item_id, None)
            except REDIS_FAILURES as exc:
                health.failed(exc, started)
                blocked.add(health)


def _lease_ran_out(item_id: str, how: Settlement) -> None:
    """A settlement found the job no longer in flight under its lease. Only an ack says so:
    the job ran here, and ran out of lease first, so it may run again. (A requeue or a drop
    did not run it: whoever has it now runs it once. An ack sent again after its reply was
    lost, and found closed by its first sending, is no such case: the scheduler tells it
    apart, ``is_closed``.)"""
    if how != "ack":
        return
    log.warning(
        "queue-ratelimit: %s was no longer in flight when settled (%s): its lease ran out "
        "first, so it may run again (or has, on another worker); raise 'lease' above the "
        "longest Redis outage and the longest task",
        item_id,
        how,
    )


def _redelivered(message: Any) -> bool:
    return bool((message.delivery_info or {}).get("redelivered"))


def _due_later(message: Any) -> bool:
    """True for ETA/countdown messages not yet due: Celery holds them, and the gate sees
    them when they fall due (through ``apply_eta_task``)."""
    eta = task_fields(message).get("eta")
    if not isinstance(eta, (str, datetime)) or not eta:  # any other type: Celery's to judge
        return False
    try:
        when = maybe_iso8601(eta)
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return bool(when > datetime.now(UTC))
