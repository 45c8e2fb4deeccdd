"""``Queue``: an ``rq.Queue`` that carries rate options and dequeues in fair order."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import rq
from redis.exceptions import RedisError
from rq.exceptions import DequeueTimeout, NoSuchJobError
from rq.job import Job, JobStatus

from .._core import check_cost
from .._errors import RateLimited, RateLimitError
from .._keys import DEFAULT_NAMESPACE
from .._limiter import Limiter
from .._scheduler import FairScheduler, Hint
from .._scopes import check_name, check_priority
from ._handover import HOLDING, LOST_REPLY, Claim

log = logging.getLogger("queue_ratelimit.rq")

OPTION_TENANT, OPTION_PRIORITY, OPTION_COST = "rate_tenant", "rate_priority", "rate_cost"
OPTIONS = (OPTION_TENANT, OPTION_PRIORITY, OPTION_COST)
ENV_NAMESPACE = "QUEUE_RATELIMIT_NAMESPACE"
# Longest a worker blocks before it looks at the fair backlog again (seconds): parked work
# that became admissible elsewhere is noticed at least this often.
POLL_INTERVAL = 0.5

_schedulers: dict[tuple[int, str], FairScheduler] = {}
# (connection, queue key) of single-queue workers that last found the queue's backlog empty.
_IDLE_BACKLOG: set[tuple[int, str]] = set()
_schedulers_lock = threading.Lock()


def scheduler_for(connection: Any, namespace: str) -> FairScheduler:
    """One scheduler per Redis connection and namespace in this process."""
    key = (id(connection), namespace)
    with _schedulers_lock:
        found = _schedulers.get(key)
        if found is None or found.client is not connection:
            found = FairScheduler(Limiter(connection, namespace=namespace))
            _schedulers[key] = found
        return found


def rate_options(meta: dict[str, Any] | None) -> tuple[str, str, float]:
    """(tenant, priority, cost) of a job from its meta, with the defaults."""
    meta = meta or {}
    return (
        check_name("tenant", meta.get(OPTION_TENANT) or "default"),
        check_priority(meta.get(OPTION_PRIORITY) or "normal"),
        check_cost(meta.get(OPTION_COST) or 1),
    )


def _has_options(meta: dict[str, Any] | None) -> bool:
    """Whether a job's meta carries any rate option (the others take their defaults)."""
    return meta is not None and any(k in meta for k in OPTIONS)


_UNNAMED_MAX = 64


class _Pending(dict[str, tuple[str, str, float]]):
    """Rate options of jobs this queue object made and has not pushed yet, by job id.

    A job made without an id gets one only when RQ saves it: reading ``job.id`` earlier
    would make one up, and RQ's ``unique=True`` check would take it for the caller's. Such
    a job waits in ``unnamed`` and is filed under its id when one is looked up.
    """

    def __init__(self) -> None:
        super().__init__()
        self.unnamed: list[tuple[Job, tuple[str, str, float]]] = []

    def add(self, job: Job, options: tuple[str, str, float]) -> None:
        if job._id is None:
            # One whose enqueue failed before RQ saved it is never named: keep a bounded few
            # (a dropped one is still routed, by the options saved with it, or gated).
            self.unnamed = [*self.unnamed[-(_UNNAMED_MAX - 1) :], (job, options)]
        else:
            self[job._id] = options

    def pop(self, job_id: str, default: Any = None) -> Any:
        if self.unnamed:
            waiting = []
            for job, options in self.unnamed:
                if job._id is None:
                    waiting.append((job, options))
                else:
                    self[job._id] = options
            self.unnamed = waiting
        return super().pop(job_id, default)

    def forget(self, job: Job) -> None:
        self.unnamed = [(j, o) for j, o in self.unnamed if j is not job]
        if job._id is not None:
            super().pop(job._id, None)


class Queue(rq.Queue):
    """An ``rq.Queue`` whose jobs carry a tenant, a priority and a cost.

    ``enqueue(f, *args, rate_tenant="acme", rate_priority="high", rate_cost=1, **kwargs)``
    takes the rate options out (they never reach ``f``), keeps them in the job's ``meta``
    and returns the job with a backpressure ``rate_hint``. Workers that use this class
    (``queue-ratelimit rq worker``, or ``rq worker --queue-class queue_ratelimit.rq.Queue``)
    dequeue in the fair scheduler's order within the budgets.

    Args:
        rate_namespace: the limiter namespace (default: ``$QUEUE_RATELIMIT_NAMESPACE`` or
            ``"default"``).
        rate_policy: ``"hint"`` (default) or ``"reject"``: raise ``RateLimited`` instead of
            enqueueing when the job's buckets would not admit it now.
        rate_hints: peek at the buckets when enqueueing (one round trip).
    """

    rate_namespace: str | None = None
    rate_policy: str = "hint"
    rate_hints: bool = True

    def __init__(
        self,
        name: str = "default",
        *args: Any,
        rate_namespace: str | None = None,
        rate_policy: str | None = None,
        rate_hints: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, *args, **kwargs)
        if rate_namespace is not None:
            self.rate_namespace = rate_namespace
        if rate_policy is not None:
            if rate_policy not in ("hint", "reject"):
                raise RateLimitError(f"rate_policy must be 'hint' or 'reject', got {rate_policy!r}")
            self.rate_policy = rate_policy
        if rate_hints is not None:
            self.rate_hints = rate_hints
        self._pending = _Pending()
        self._enqueue_options = threading.local()

    # -- configuration -----------------------------------------------------------------
    @classmethod
    def namespace_for(cls, queue: Any = None) -> str:
        return (
            getattr(queue, "rate_namespace", None)
            or cls.rate_namespace
            or os.environ.get(ENV_NAMESPACE)
            or DEFAULT_NAMESPACE
        )

    @property
    def rate_scheduler(self) -> FairScheduler:
        """The fair scheduler this queue's jobs go through (on the queue's Redis)."""
        return scheduler_for(self.connection, self.namespace_for(self))

    @property
    def rate_backlog(self) -> int:
        """Jobs of this queue waiting in the fair backlog (``count`` covers the plain list)."""
        return self.rate_scheduler.backlog(self.name)

    # -- producer side ----------------------------------------------------------------------
    @contextmanager
    def _rate(self, options: dict[str, Any]) -> Iterator[Hint | None]:
        tenant, priority, cost = rate_options(options)
        hint = None
        if self.rate_hints or self.rate_policy == "reject":
            try:
                hint = self.rate_scheduler.hint(
                    tenant, queue=self.name, priority=priority, cost=cost
                )
            except (RedisError, RateLimitError) as exc:
                log.warning("queue-ratelimit: no backpressure hint for %s: %s", tenant, exc)
        if self.rate_policy == "reject" and hint is not None and not hint.allowed:
            raise RateLimited(
                f"job for tenant {tenant!r} refused: {hint.denied_by or 'backlog'} would admit "
                f"it in {hint.wait_ms:.0f} ms",
                wait_ms=hint.wait_ms,
                denied_by=hint.denied_by,
            )
        # Only the options given go into the job's meta (checked above); the worker reads
        # the defaults for the others (``rate_options``).
        checked = {OPTION_TENANT: tenant, OPTION_PRIORITY: priority, OPTION_COST: cost}
        self._enqueue_options.value = {
            k: v for k, v in checked.items() if options.get(k) is not None
        }
        try:
            yield hint
        finally:
            self._enqueue_options.value = None

    @staticmethod
    def _pop_options(kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}

    def _nested(self, options: dict[str, Any]) -> bool:
        """Called by our own enqueue method (RQ's enqueue_in calls enqueue_at, enqueue calls
        enqueue_call): the outer call's options stand, and it sets the hint."""
        return getattr(self._enqueue_options, "value", None) is not None and not options

    def _finish(self, jobs: Iterable[Job], hint: Hint | None) -> None:
        for job in jobs:
            # Jobs RQ did not push (scheduled, deferred) are pushed later by another queue
            # object, which reads the options from the saved job.
            self._pending.forget(job)
            job.rate_hint = hint  # type: ignore[attr-defined]

    def enqueue(self, f: Any, *args: Any, **kwargs: Any) -> Job:
        """``rq.Queue.enqueue`` plus ``rate_tenant``, ``rate_priority`` and ``rate_cost``."""
        with self._rate(self._pop_options(kwargs)) as hint:
            job = super().enqueue(f, *args, **kwargs)
        self._finish([job], hint)
        return job

    def enqueue_call(self, *args: Any, **kwargs: Any) -> Job:
        """``rq.Queue.enqueue_call`` plus the rate options as keyword arguments."""
        options = self._pop_options(kwargs)
        if self._nested(options):
            return super().enqueue_call(*args, **kwargs)
        with self._rate(options) as hint:
            job = super().enqueue_call(*args, **kwargs)
        self._finish([job], hint)
        return job

    def enqueue_at(self, datetime: Any, f: Any, *args: Any, **kwargs: Any) -> Job:
        """``rq.Queue.enqueue_at`` plus the rate options (gated when the job falls due)."""
        options = self._pop_options(kwargs)
        if self._nested(options):
            return super().enqueue_at(datetime, f, *args, **kwargs)
        with self._rate(options) as hint:
            job = super().enqueue_at(datetime, f, *args, **kwargs)
        self._finish([job], hint)
        return job

    def enqueue_in(self, time_delta: Any, func: Any, *args: Any, **kwargs: Any) -> Job:
        """``rq.Queue.enqueue_in`` plus the rate options."""
        with self._rate(self._pop_options(kwargs)) as hint:
            job = super().enqueue_in(time_delta, func, *args, **kwargs)
        self._finish([job], hint)
        return job

    def enqueue_many(self, job_datas: Any, *args: Any, **kwargs: Any) -> list[Job]:
        """``rq.Queue.enqueue_many``; give each job its options in ``meta`` (``prepare_data``)."""
        jobs = super().enqueue_many(job_datas, *args, **kwargs)
        self._finish(jobs, None)
        return jobs

    def create_job(self, *args: Any, **kwargs: Any) -> Job:
        options = getattr(self._enqueue_options, "value", None)
        if options:
            kwargs["meta"] = {**(kwargs.get("meta") or {}), **options}
        job = super().create_job(*args, **kwargs)
        # A job made by our enqueue methods is routed by its options, given or defaults
        # (None: inside no enqueue of ours, e.g. create_job called directly).
        if options is not None or _has_options(job.meta):
            self._pending.add(job, rate_options(job.meta))
        return job

    def push_job_id(self, job_id: str, pipeline: Any = None, at_front: bool = False) -> None:
        """Into the fair backlog when the queue is contended, else onto RQ's own list."""
        options = self._pending.pop(job_id, None) or self._stored_options(job_id)
        if options is None:
            return super().push_job_id(job_id, pipeline=pipeline, at_front=at_front)
        tenant, priority, cost = options
        self.rate_scheduler.route(
            tenant,
            job_id,
            self.key,
            queue=self.name,
            priority=priority,
            cost=cost,
            at_front=at_front,
            pipeline=pipeline,
        )
        return None

    def _stored_options(self, job_id: str) -> tuple[str, str, float] | None:
        """Rate options of a job already saved (a dependent, a retry, a requeue)."""
        try:
            job = self.job_class.fetch(
                job_id, connection=self.connection, serializer=self.serializer
            )
        except NoSuchJobError:
            return None  # saved in a pipeline not yet executed: the worker gates it
        if not _has_options(job.meta):
            return None
        return rate_options(job.meta)

    # -- worker side -------------------------------------------------------------------------
    @classmethod
    def dequeue_any(
        cls,
        queues: Iterable[Any],
        timeout: int | None,
        connection: Any = None,
        job_class: Any = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[Job, Any] | None:
        """The next job in fair order that every bucket admits.

        Parked jobs come from the fair backlog, handed into RQ's own bookkeeping in the same
        atomic step; jobs on RQ's plain lists (enqueued by plain ``rq.Queue``, the scheduler
        or a retry) pass the gate, and wait in the backlog when it says so. With no timeout
        (``--burst``) the worker still waits for parked jobs to become admissible rather
        than leave them behind; with one it raises ``DequeueTimeout`` when it runs out.

        A job whose move was cut short by a lost reply (Redis restarted, the connection
        dropped) is settled by the next call, before anything else: run, or put back.

        ``timeout=0`` raises ``ValueError``, as RQ's own ``dequeue_any`` does (it never
        blocks without end).
        """
        if timeout == 0:
            raise ValueError(
                "timeout=0 would block forever, which RQ does not do: give a timeout > 0, "
                "or None not to block"
            )
        queues = list(queues)
        if not queues:
            return None
        job_cls = job_class or cls.job_class
        with HOLDING.moving_job():
            HOLDING.check_stop()
            found = cls._dequeue(queues, timeout, connection, job_cls, serializer)
        if found is not None:
            # A warm shutdown that waited for this move: the worker stops after this job.
            HOLDING.stop_deferred = False
        return found

    @classmethod
    def _dequeue(
        cls,
        queues: list[Any],
        timeout: int | None,
        connection: Any,
        job_cls: Any,
        serializer: Any,
    ) -> tuple[Job, Any] | None:
        by_name = {q.name: q for q in queues}
        scheduler = scheduler_for(connection, cls.namespace_for(queues[0]))
        # RQ removes a job from its intermediate list only for single-queue workers, so the
        # backlog hands over onto that list only then (multi-queue workers pop plainly too).
        single = len(queues) == 1
        handoff = {q.name: q.intermediate_queue_key for q in queues} if single else None
        receipt_key = scheduler.receipt_key(HOLDING.owner())
        deadline = None if timeout is None else time.monotonic() + timeout
        if HOLDING.claims(connection):
            found = cls._settle(by_name, scheduler, connection, job_cls, serializer, receipt_key)
            if found is not None:
                return found
        # A single queue whose fair backlog was empty last time: RQ's list first, which
        # saves the dispatch call per job while the queue is uncontended. The gate still
        # parks a job if a backlog has formed since, and then the backlog goes first again.
        idle_key = (id(connection), queues[0].key)
        if single and idle_key in _IDLE_BACKLOG:
            found, _moved = cls._from_plain_lists(
                queues, scheduler, connection, job_cls, serializer
            )
            if found is not None:
                return found
            _IDLE_BACKLOG.discard(idle_key)
        while True:
            HOLDING.check_stop()
            nonce = HOLDING.nonce()
            try:
                batch = scheduler.dispatch(
                    list(by_name),
                    with_payload=False,
                    hand_over=True,
                    handoff_lists=handoff,
                    receipt=(receipt_key, nonce),
                )
            except LOST_REPLY:
                HOLDING.claim(connection, Claim(None, None, nonce=nonce, listed=single))
                raise
            for n, item in enumerate(batch.items):
                queue = by_name[item.queue]
                try:
                    found = cls._take(queue, item.id, connection, job_cls, serializer, single)
                except LOST_REPLY:
                    for rest in batch.items[n:]:
                        HOLDING.claim(connection, Claim(rest.queue, rest.id, listed=single))
                    raise
                if found is not None:
                    return found
            if batch.items:
                continue
            if single and batch.wait_ms is None:
                _IDLE_BACKLOG.add(idle_key)
            found, progressed = cls._from_plain_lists(
                queues, scheduler, connection, job_cls, serializer
            )
            if found is not None:
                return found
            if progressed:
                continue
            wait = None if batch.wait_ms is None else batch.wait_ms / 1000
            if deadline is None:
                if wait is None:
                    return None
                HOLDING.pause(min(max(wait, 0.001), POLL_INTERVAL))
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise DequeueTimeout(timeout, [q.key for q in queues])
            block = min(left, POLL_INTERVAL if wait is None else max(wait, 0.001), POLL_INTERVAL)
            if single:
                # Blocks while holding nothing, but a warm shutdown waits for it (at most
                # POLL_INTERVAL): a job it moves must not be left behind.
                queue = queues[0]
                job_id = connection.blmove(queue.key, queue.intermediate_queue_key, block)
                if job_id is not None:
                    found = cls._gate_popped(
                        queue, _text(job_id), scheduler, connection, job_cls, serializer, True
                    )
                    if found is not None:
                        return found
            else:
                HOLDING.pause(block)

    @classmethod
    def _take(
        cls, queue: Any, job_id: str, connection: Any, job_cls: Any, serializer: Any, listed: bool
    ) -> tuple[Job, Any] | None:
        """A dispatched job, to run unless it was cancelled or deleted while it waited."""
        job = cls._fetch(job_cls, job_id, connection, serializer)
        if job is not None and job.get_status(refresh=False) == JobStatus.QUEUED:
            return job, queue
        if listed:
            connection.lrem(queue.intermediate_queue_key, 1, job_id)
        return None

    @classmethod
    def _settle(
        cls,
        by_name: dict[str, Any],
        scheduler: FairScheduler,
        connection: Any,
        job_cls: Any,
        serializer: Any,
        receipt_key: str,
    ) -> tuple[Job, Any] | None:
        """Settle the jobs this process may hold after a lost reply: run one, or put back.

        Only this process knows of such a job: no other worker takes a job off RQ's
        intermediate list, and a receipt names the caller it was written for.
        """
        for claim in HOLDING.claims(connection):
            if claim.job_id is None:  # a dispatch whose reply was lost: what did it hand over?
                raw = connection.get(receipt_key)
                words = _text(raw).split() if raw is not None else []
                handed = words[1:] if words[:1] == [claim.nonce] else []
                HOLDING.settle(
                    connection,
                    claim,
                    *(Claim(None, i, gated=True, listed=claim.listed) for i in handed),
                )
        for claim in HOLDING.claims(connection):
            job = cls._fetch(job_cls, claim.job_id, connection, serializer)
            queue = by_name.get(claim.queue or (job.origin if job is not None else ""))
            if queue is None:
                if job is None:
                    HOLDING.settle(connection, claim)
                continue  # a queue this worker does not serve (now): keep the claim
            if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
                if claim.listed:
                    connection.lrem(queue.intermediate_queue_key, 1, claim.job_id)
                HOLDING.settle(connection, claim)
                continue
            if claim.gated:
                log.warning("queue-ratelimit: job %s was handed over unseen; running it", job.id)
                HOLDING.settle(connection, claim)
                return job, queue
            if claim.listed and connection.lpos(queue.intermediate_queue_key, job.id) is None:
                # It left the list: it was parked (or is someone else's now).
                HOLDING.settle(connection, claim)
                continue
            found = cls._gate_popped(
                queue, job.id, scheduler, connection, job_cls, serializer, claim.listed
            )
            HOLDING.settle(connection, claim)
            if found is not None:
                return found
        return None

    @staticmethod
    def _fetch(job_cls: Any, job_id: Any, connection: Any, serializer: Any) -> Job | None:
        try:
            return job_cls.fetch(_text(job_id), connection=connection, serializer=serializer)
        except NoSuchJobError:
            return None

    @classmethod
    def _from_plain_lists(
        cls,
        queues: list[Any],
        scheduler: FairScheduler,
        connection: Any,
        job_cls: Any,
        serializer: Any,
    ) -> tuple[tuple[Job, Any] | None, bool]:
        """Pop RQ's own lists in queue order; returns (job to run, whether anything moved)."""
        single = len(queues) == 1
        progressed = False
        for queue in queues:
            if single:
                job_id = connection.lmove(queue.key, queue.intermediate_queue_key)
            else:
                job_id = connection.lpop(queue.key)
            if job_id is None:
                continue
            progressed = True
            found = cls._gate_popped(
                queue, _text(job_id), scheduler, connection, job_cls, serializer, single
            )
            if found is not None:
                return found, True
        return None, progressed

    @classmethod
    def _gate_popped(
        cls,
        queue: Any,
        job_id: str,
        scheduler: FairScheduler,
        connection: Any,
        job_cls: Any,
        serializer: Any,
        in_intermediate: bool,
    ) -> tuple[Job, Any] | None:
        """``_admit_plain``, leaving a claim on the job if a reply is lost on the way."""
        try:
            return cls._admit_plain(
                queue, job_id, scheduler, connection, job_cls, serializer, in_intermediate
            )
        except LOST_REPLY:
            HOLDING.claim(
                connection, Claim(queue.name, job_id, gated=False, listed=in_intermediate)
            )
            raise

    @classmethod
    def _admit_plain(
        cls,
        queue: Any,
        job_id: Any,
        scheduler: FairScheduler,
        connection: Any,
        job_cls: Any,
        serializer: Any,
        in_intermediate: bool,
    ) -> tuple[Job, Any] | None:
        """Gate a job popped from a plain list: run it, or park it in the backlog."""
        job = cls._fetch(job_cls, job_id, connection, serializer)
        if job is None:
            if in_intermediate:
                connection.lrem(queue.intermediate_queue_key, 1, job_id)
            return None
        try:
            tenant, priority, cost = rate_options(job.meta)
        except RateLimitError as exc:
            log.error(
                "queue-ratelimit: job %s has bad rate options (%s); using defaults", job.id, exc
            )
            tenant, priority, cost = rate_options({})
        verdict = scheduler.gate(tenant, job.id, queue=queue.name, priority=priority, cost=cost)
        if verdict.action == "run":
            return job, queue
        if verdict.action == "park":
            # Into Redis first, then off RQ's list: a crash in between leaves a copy that
            # the next gate recognises as a duplicate, never a lost job.
            scheduler.submit(tenant, job.id, queue=queue.name, priority=priority, cost=cost)
        if in_intermediate:
            connection.lrem(queue.intermediate_queue_key, 1, job.id)
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
