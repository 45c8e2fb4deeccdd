"""Worker side: the consumer bootstep that gates every task message before the pool.

A message whose buckets admit it (and whose queue has no fair backlog to respect) runs at
once. Any other is parked in the fair scheduler's Redis backlog *before* it is acknowledged
to the broker, so it never holds a prefetch slot and is never lost; workers re-admit parked
work in the scheduler's fair order, across all hosts, through a timer on the consumer's
event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from celery import bootsteps
from celery.exceptions import InvalidTaskError
from celery.utils.time import maybe_iso8601
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.serialization import prepare_accept_content
from kombu.utils.functional import maybe_list
from redis.exceptions import RedisError
from vine import promise

from .._durability import persistence_warning
from .._errors import RateLimitError
from .._scheduler import DispatchedItem, GateVerdict
from .._scopes import check_name
from ._options import HeaderOptions, RateOptions, gated
from ._parking import BacklogChannel, decode_message, encode_message, from_backlog
from ._runtime import Runtime, runtime_of

log = logging.getLogger("queue_ratelimit.celery")
Strategy = Callable[..., Any]
# Re-admit at most this many jobs per dispatch call (one round trip each batch).
DISPATCH_BATCH = 16
# How a re-admitted job's in-flight record is closed: ran (remembered as done), back to
# the head of its backlog, or dropped (an invalid message).
Settlement = Literal["ack", "requeue", "drop"]


class Job:
    """A task message as the gate sees it."""

    __slots__ = ("item_id", "lane", "options")

    def __init__(self, item_id: str, lane: str, options: RateOptions) -> None:
        self.item_id = item_id
        self.lane = lane
        self.options = options


class RateLimitGate(bootsteps.StartStopStep):
    """Consumer step: wraps the task strategies so that every message passes the gate."""

    label = "queue-ratelimit gate"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.runtime: Runtime | None = runtime_of(c.app)
        self.enabled = self.runtime is not None
        if self.runtime is not None:
            self.header_options = HeaderOptions(self.runtime.settings)
        self.consumer = c
        self.originals: dict[str, Strategy] = {}
        # Re-admitted jobs by item id: their lease fences the ack, nack or renewal.
        self.held: dict[str, DispatchedItem] = {}
        # In-flight records that could not be closed because Redis was unreachable; they
        # are closed first thing when it is back, before their leases can run out (the
        # lease must outlast the outage, or another worker takes the job over again).
        self.unsettled: dict[str, Settlement] = {}
        self.closed_holds = 0
        self.stats = {
            "admitted": 0,
            "admitted_on_credit": 0,
            "parked": 0,
            "readmitted": 0,
            "duplicates": 0,
            "failed_open": 0,
        }
        self.lanes: list[str] = []
        self.accept: Any = None
        self.channel = BacklogChannel(self._on_backlog_ack, self._on_backlog_reject)
        self._timer: Any = None
        self._durability_checked = False
        # (tenant, lane, priority, cost) -> [jobs this worker may still admit, valid until]
        self.credits: dict[tuple[str, str, str, float], list[Any]] = {}
        self._credit_timer: Any = None
        self._timer_due = 0.0
        self._renew_timer: Any = None
        self._redis_down_since: float | None = None
        if self.enabled:
            # Strategies capture this method when they are built (in Tasks.start), so ETA
            # tasks are gated when they fall due rather than when they arrive.
            self._apply_eta_task = c.apply_eta_task
            c.apply_eta_task = self._gated_apply_eta_task

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, c: Any) -> None:
        assert self.runtime is not None
        self.lanes = self._lanes(c)
        self.accept = prepare_accept_content(c.app.conf.accept_content)
        for name, strategy in list(c.strategies.items()):
            if getattr(strategy, "__queue_ratelimit__", False):
                continue
            self.originals[name] = strategy
            c.strategies[name] = self._wrap(name, strategy)
        self._schedule(0.0)
        self._renew_timer = c.timer.call_repeatedly(
            max(self.runtime.settings.lease / 3, 0.1), self._renew_leases
        )
        log.info(
            "queue-ratelimit gate on queues %s (namespace %s)",
            ", ".join(self.lanes),
            self.runtime.settings.namespace,
        )
        if not self._durability_checked:
            self._durability_checked = True
            warning = persistence_warning(self.runtime.limiter.client)
            if warning:
                log.warning("queue-ratelimit: %s", warning)

    def stop(self, c: Any) -> None:
        for entry in (self._timer, self._renew_timer, self._credit_timer):
            if entry is not None:
                entry.cancel()
        self._timer = self._renew_timer = self._credit_timer = None
        for key, (units, _) in list(self.credits.items()):
            if units > 0:
                self._refund_credit(key, units)
        self.credits.clear()

    def info(self, c: Any) -> dict[str, Any]:
        """Shown by ``celery inspect stats``."""
        return {
            "queue_ratelimit": {
                **self.stats,
                "held": len(self.held),
                "unsettled": len(self.unsettled),
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

    def _capacity(self) -> int:
        """How many re-admitted jobs this worker may take now."""
        from celery.worker.state import reserved_requests

        assert self.runtime is not None
        pool = getattr(self.consumer, "pool", None)
        concurrency = int(
            getattr(pool, "num_processes", None) or self.consumer.initial_prefetch_count or 1
        )
        limit = self.runtime.settings.max_held or 2 * concurrency
        return max(0, min(limit - len(self.held), concurrency - len(reserved_requests)))

    def _job(self, message: Any) -> Job | None:
        """The gate's view of a message; None for tasks that are not gated."""
        assert self.runtime is not None
        headers = message.headers or {}
        task = self.consumer.app.tasks.get(headers.get("task"))
        if task is None or not gated(task):
            return None
        try:
            options = self.header_options(headers)
        except RateLimitError as exc:
            log.error("queue-ratelimit: %s in message %s; using defaults", exc, headers.get("id"))
            options = self.header_options({})
        routing_key = (message.delivery_info or {}).get("routing_key")
        lane = routing_key if routing_key in self.lanes else self.lanes[0]
        item_id = f"{headers.get('id')}.{headers.get('retries') or 0}"
        return Job(item_id, lane, options)

    # -- credit: admissions taken in advance while nothing is contended ----------------------
    @staticmethod
    def _credit_key(job: Job) -> tuple[str, str, str, float]:
        o = job.options
        return (o.tenant, job.lane, o.priority, o.cost)

    def _spend_credit(self, job: Job, message: Any) -> bool:
        """Admit ``job`` on credit, without a round trip, if this worker holds some.

        A redelivered message always asks Redis: only Redis can tell whether it already ran
        through the backlog."""
        entry = self.credits.get(self._credit_key(job))
        if entry is None or entry[0] <= 0 or entry[1] < time.monotonic():
            return False
        if (message.delivery_info or {}).get("redelivered"):
            return False
        entry[0] -= 1
        return True

    def _grant_credit(self, job: Job, units: int) -> None:
        assert self.runtime is not None
        key = self._credit_key(job)
        left = self.credits.pop(key, None)
        if left is not None and left[0] > 0:
            self._refund_credit(key, left[0])
        self.credits[key] = [units, time.monotonic() + self.runtime.settings.credit_ttl]
        if self._credit_timer is None:
            self._credit_timer = self.consumer.timer.call_after(
                self.runtime.settings.credit_ttl, self._expire_credit
            )

    def _expire_credit(self) -> None:
        """Give back the tokens of credit that went unused (it lives ``credit_ttl``)."""
        self._credit_timer = None
        now = time.monotonic()
        for key, (units, until) in list(self.credits.items()):
            if until <= now:
                del self.credits[key]
                if units > 0:
                    self._refund_credit(key, units)
        if self.credits:
            assert self.runtime is not None
            self._credit_timer = self.consumer.timer.call_after(
                self.runtime.settings.credit_ttl, self._expire_credit
            )

    def _refund_credit(self, key: tuple[str, str, str, float], units: int) -> None:
        assert self.runtime is not None
        tenant, lane, priority, cost = key
        try:
            self.runtime.limiter.refund(tenant, queue=lane, priority=priority, cost=units * cost)
        except RateLimitError as exc:
            # Unused tokens stay spent: the caps only get stricter, never looser.
            log.warning("queue-ratelimit: could not refund %d unused credit: %s", units, exc)

    def _verdict(self, job: Job) -> GateVerdict | None:
        """Ask Redis; None when it is unreachable (the fail mode decides)."""
        assert self.runtime is not None
        o = job.options
        try:
            verdict = self.runtime.scheduler.gate(
                o.tenant,
                job.item_id,
                queue=job.lane,
                priority=o.priority,
                cost=o.cost,
                credit=self.runtime.settings.credit,
            )
        except RedisError as exc:
            self._redis_failed(exc)
            return None
        self._redis_ok()
        return verdict

    def _redis_failed(self, exc: Exception) -> None:
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            assert self.runtime is not None
            log.error(
                "queue-ratelimit: Redis unreachable (%s): gate fails %s until it returns",
                exc,
                self.runtime.settings.fail_mode.upper(),
            )

    def _redis_ok(self) -> None:
        if self._redis_down_since is not None:
            log.warning(
                "queue-ratelimit: Redis reachable again after %.1fs; gate enforcing",
                time.monotonic() - self._redis_down_since,
            )
            self._redis_down_since = None

    def _park(self, job: Job, message: Any) -> bool:
        """Put the message in the fair backlog; True once it is safely in Redis."""
        assert self.runtime is not None
        o = job.options
        try:
            self.runtime.scheduler.submit(
                o.tenant,
                job.item_id,
                queue=job.lane,
                priority=o.priority,
                cost=o.cost,
                payload=encode_message(message),
            )
        except RedisError as exc:
            self._redis_failed(exc)
            return False
        self.stats["parked"] += 1
        return True

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
                job,
                message,
                run=lambda: strategy(message, body, ack, reject, callbacks, **kw),
                ack=lambda: ack(log, self.consumer.connection_errors),
                hand_back=lambda: reject(log, self.consumer.connection_errors, requeue=True),
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

        def hand_back() -> None:
            request.reject(requeue=True)
            self.consumer.qos.decrement_eventually()

        return self._decide(
            job,
            message,
            run=lambda: self._apply_eta_task(request),
            ack=acknowledge,
            hand_back=hand_back,
        )

    def _decide(
        self,
        job: Job,
        message: Any,
        *,
        run: Callable[[], Any],
        ack: Callable[[], Any],
        hand_back: Callable[[], Any],
    ) -> Any:
        assert self.runtime is not None
        if self._spend_credit(job, message):
            self.stats["admitted"] += 1
            self.stats["admitted_on_credit"] += 1
            return run()
        verdict = self._verdict(job)
        if verdict is not None and verdict.action == "run":
            self.stats["admitted"] += 1
            if verdict.credit:
                self._grant_credit(job, verdict.credit)
            return run()
        if verdict is not None and verdict.action == "duplicate":
            # Already parked, in flight, or run through the backlog: this is a broker
            # redelivery of a message we took over; acknowledging it loses nothing.
            self.stats["duplicates"] += 1
            log.warning("queue-ratelimit: dropping duplicate delivery of %s", job.item_id)
            return ack()
        if verdict is not None and self._park(job, message):
            ack()  # only now: the job is in Redis (publish before ack)
            self._schedule(verdict.wait_ms / 1000)
            return None
        # Redis is unreachable.
        if self.runtime.settings.fail_mode == "open":
            self.stats["failed_open"] += 1
            return run()
        limit = self.runtime.settings.max_held or 64
        if self.closed_holds >= limit:
            return hand_back()  # back to the broker: nothing is lost, memory stays bounded
        self.closed_holds += 1

        def retry() -> None:
            self.closed_holds -= 1
            self._decide(job, message, run=run, ack=ack, hand_back=hand_back)

        self.consumer.timer.call_after(1.0, retry)
        return None

    # -- re-admission ----------------------------------------------------------------------
    def _schedule(self, delay: float) -> None:
        """Run ``_readmit`` after ``delay`` seconds (sooner if already due sooner)."""
        assert self.runtime is not None
        delay = min(max(delay, 0.0), self.runtime.settings.poll_interval)
        due = time.monotonic() + delay
        if self._timer is not None:
            if self._timer_due <= due + 0.0005:
                return
            self._timer.cancel()
        self._timer = self.consumer.timer.call_after(delay, self._readmit)
        self._timer_due = due

    def _readmit(self) -> None:
        assert self.runtime is not None
        self._timer = None
        delay = self.runtime.settings.poll_interval
        # What an outage left open is closed before anything new is taken.
        settled = not self.unsettled or self._settle_pending()
        free = self._capacity()
        if not settled:
            pass  # Redis is still unreachable: nothing to dispatch either
        elif free == 0:
            delay = min(delay, 0.05)
        else:
            try:
                batch = self.runtime.scheduler.dispatch(
                    self.lanes, max_items=min(free, DISPATCH_BATCH)
                )
            except RedisError as exc:
                self._redis_failed(exc)
            else:
                self._redis_ok()
                for item in batch.items:
                    self._deliver(item)
                if len(batch.items) == min(free, DISPATCH_BATCH):
                    delay = 0.0
                elif batch.wait_ms is not None:
                    delay = batch.wait_ms / 1000
        self._schedule(delay)

    def _deliver(self, item: DispatchedItem) -> None:
        c = self.consumer
        item_id = item.id
        self.held[item_id] = item
        message = decode_message(item.payload, item_id, self.channel, accept=self.accept)
        name = (message.headers or {}).get("task")
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
        if self._settle(item_id, "requeue" if requeue else "ack") and requeue:
            self._schedule(0.0)

    def _settle(self, item_id: str, how: Settlement) -> bool:
        """Close a re-admitted job's in-flight record. False when Redis is unreachable:
        the job stays held and is settled as soon as Redis is back.

        Celery acks and rejects from its event loop, where an exception would stop the
        worker (RabbitMQ) or be logged and forgotten (Redis broker), leaving the record
        open until its lease runs out and the job is handed out again: a duplicate.
        """
        assert self.runtime is not None
        scheduler = self.runtime.scheduler
        item = self.held.get(item_id, item_id)
        try:
            if how == "ack":
                closed = scheduler.ack(item, remember=self.runtime.settings.dedupe_window)
            else:
                closed = scheduler.nack(item, requeue=how == "requeue")
        except RedisError as exc:
            self._redis_failed(exc)
            self.unsettled[item_id] = how
            return False
        self._redis_ok()
        self.unsettled.pop(item_id, None)
        self.held.pop(item_id, None)
        if not closed:
            log.warning(
                "queue-ratelimit: %s was no longer in flight when settled (%s): its lease ran "
                "out first, so it may run again (or has, on another worker); raise 'lease' "
                "above the longest Redis outage and the longest task",
                item_id,
                how,
            )
        return True

    def _settle_pending(self) -> bool:
        """Settle what an outage left open; True when nothing is left."""
        return all(self._settle(item_id, how) for item_id, how in list(self.unsettled.items()))

    def _renew_leases(self) -> None:
        """Keep the leases of re-admitted jobs that are still waiting or running alive."""
        assert self.runtime is not None
        if self.unsettled and not self._settle_pending():
            return
        for item_id, item in list(self.held.items()):
            try:
                if not self.runtime.scheduler.extend(item):
                    self.held.pop(item_id, None)
            except RedisError as exc:
                self._redis_failed(exc)
                return


def _due_later(message: Any) -> bool:
    """True for ETA/countdown messages not yet due: Celery holds them, and the gate sees
    them when they fall due (through ``apply_eta_task``)."""
    eta = (message.headers or {}).get("eta")
    if not eta:
        return False
    try:
        when = maybe_iso8601(eta)
    except (TypeError, ValueError):
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return bool(when > datetime.now(UTC))
