"""``Queue``: an ``rq.Queue`` that carries rate options and dequeues in fair order."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import rq
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job

from .._breaker import guard_of, report
from .._errors import BackendError, BackendUnavailable, RateLimited, RateLimitError
from .._keys import DEFAULT_NAMESPACE
from .._scheduler import FairScheduler, Hint
from .._scopes import _shown
from .._shard_layout import layouts
from ._dequeue import FairDequeue, _text
from ._handover import HOLDING
from ._options import (
    ENV_NAMESPACE,
    OPTION_COST,
    OPTION_PRIORITY,
    OPTION_TENANT,
    OPTIONS,
    rate_options,
    scheduler_for,
    stored_rate_options,
)

log = logging.getLogger("queue_ratelimit.rq")


def _has_options(meta: dict[str, Any] | None) -> bool:
    """Whether a job's meta carries any rate option (the others take their defaults)."""
    return isinstance(meta, dict) and any(k in meta for k in OPTIONS)


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
        rate_hints: predict when each job would start, as it is enqueued (one round trip).
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
                raise RateLimitError(
                    f"rate_policy must be 'hint' or 'reject', got {_shown(rate_policy)}"
                )
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
        """Jobs of this queue waiting in the fair backlog (``count`` covers them too)."""
        return self.rate_scheduler.backlog(self.name)

    # -- RQ's views of what waits --------------------------------------------------------
    # A job waits on RQ's list or in the fair backlog (its status is "queued" in both), so
    # RQ's views count both: ``rq info --queue-class queue_ratelimit.rq.Queue`` and
    # ``len(queue)`` tell how many wait, ``job_ids`` which (RQ's list first, then the
    # backlog, longest waiting first; the backlog is served in fair order, not that one).
    def _lane_keys(self, kind: str) -> list[str] | None:
        """A key of this queue's lane (``counts`` or ``age``) on every shard (one for an
        unsharded namespace); None for a name that is no valid lane (such a queue never
        has a backlog)."""
        try:
            spaces = layouts(self.rate_scheduler.limiter)
            return [k.counts(self.name) if kind == "counts" else k.age(self.name) for k in spaces]
        except RateLimitError:
            return None

    @property
    def count(self) -> int:
        """Jobs waiting in this queue: on RQ's list and in the fair backlog."""
        counts_keys = self._lane_keys("counts")
        if counts_keys is None:
            return int(super().count)
        pipe = self.connection.pipeline(transaction=False)
        pipe.llen(self.key)
        for counts in counts_keys:  # (one per shard)
            pipe.hget(counts, ":total")
        listed, *parked = pipe.execute()
        return int(listed) + sum(int(p or 0) for p in parked)

    def get_job_ids(self, offset: int = 0, length: int = -1) -> list[str]:
        """A slice of the ids of the jobs waiting in this queue: RQ's list, then the fair
        backlog (longest waiting first, over every shard)."""
        ages = self._lane_keys("age")
        if ages is None or length == 0:
            return list(super().get_job_ids(offset, length))
        last = offset + length - 1 if length > 0 else -1
        pipe = self.connection.pipeline(transaction=False)
        pipe.llen(self.key)
        pipe.lrange(self.key, offset, last)
        listed, ids = pipe.execute()
        start = max(0, offset - listed)
        stop = -1 if last < 0 else last - listed
        if stop < -1 or (last >= 0 and stop < start):
            return [_text(i) for i in ids]
        return [_text(i) for i in (*ids, *self._parked_ids(ages, start, stop))]

    def _parked_ids(self, ages: list[str], start: int, stop: int) -> list[Any]:
        """Positions ``start`` to ``stop`` (-1: the end) of the fair backlog, longest waiting
        first: a range of the one lane, or of the shards' lanes merged by first-queued time
        (ties by id, as a sorted set orders them)."""
        if len(ages) == 1:
            return cast("list[Any]", self.connection.zrange(ages[0], start, stop))
        pipe = self.connection.pipeline(transaction=False)
        for age in ages:
            pipe.zrange(age, 0, stop, withscores=True)  # (each shard's first stop + 1)
        merged = sorted((score, item) for reply in pipe.execute() for item, score in reply)
        chosen = merged[start:] if stop < 0 else merged[start : stop + 1]
        return [item for _, item in chosen]

    def empty(self) -> int:
        """Remove every job waiting in this queue, as ``rq.Queue.empty`` does (the jobs'
        records, results and dependents lists go with them), on RQ's list and in the fair
        backlog. Jobs already handed to a worker are not waiting and are left alone.
        Returns how many jobs were removed (``rq empty`` prints it).

        RQ's list goes first, then the backlog (``FairScheduler.purge``, in atomic steps);
        a job a worker moves from the one to the other meanwhile goes too.
        """
        removed = int(super().empty() or 0)
        if self._lane_keys("counts") is None:
            return removed  # a name no lane can have: RQ's list is all there is
        dropped = self.rate_scheduler.purge(self.name)
        if dropped:
            from rq.results import Result

            prefix, results = self.job_class.redis_job_namespace_prefix, Result.get_key("")
            for start in range(0, len(dropped), 1000):
                with self.connection.pipeline(transaction=False) as pipe:
                    for job_id in dropped[start : start + 1000]:
                        pipe.delete(f"{prefix}{job_id}", f"{results}{job_id}")
                        pipe.delete(f"{prefix}{job_id}:dependents")
                    pipe.execute()
        return removed + len(dropped)

    # -- producer side ----------------------------------------------------------------------
    @contextmanager
    def _rate(self, options: dict[str, Any]) -> Iterator[Hint | None]:
        tenant, priority, cost = rate_options(options)
        hint = None
        # While this Redis is known not to answer (a hint waited out its timeout a moment
        # ago), no hint is asked for: the job is enqueued without one, at once.
        guard = guard_of(self.connection)
        if (self.rate_hints or self.rate_policy == "reject") and guard.allow():
            try:
                hint = self.rate_scheduler.hint(
                    tenant, queue=self.name, priority=priority, cost=cost
                )
            except (RedisError, RateLimitError) as exc:
                report(guard, exc)
                log.warning("queue-ratelimit: no backpressure hint for %s: %s", tenant, exc)
            except BaseException:
                guard.release()
                raise
            else:
                report(guard, None)
        if self.rate_policy == "reject" and hint is not None and not hint.allowed:
            raise RateLimited(
                f"job for tenant {tenant!r} refused: {hint.binding or 'backlog'} would admit "
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
        # The wait it predicts: how long the job counts as in transit on RQ's list (route).
        self._enqueue_options.wait_ms = hint.wait_ms if hint is not None else 0.0
        try:
            yield hint
        finally:
            self._enqueue_options.value = None
            self._enqueue_options.wait_ms = 0.0

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
        if options is not None:
            self._pending.add(job, rate_options(job.meta))  # bad meta given here: raise
        elif _has_options(job.meta):
            self._pending.add(job, stored_rate_options(job.meta, None))
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
            wait_ms=getattr(self._enqueue_options, "wait_ms", 0.0),
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
        return stored_rate_options(job.meta, job_id)

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
        """The next job in fair order that every bucket admits (see ``FairDequeue``).

        Jobs waiting on RQ's own lists (enqueued by plain ``rq.Queue``, the scheduler or a
        retry) join the fair backlog first, so they are served in the same order. With no
        timeout (``--burst``) the worker still waits for parked jobs to become admissible
        rather than leave them behind; with one it raises ``DequeueTimeout`` when it runs
        out. A job whose move was cut short by a lost reply (Redis restarted, the
        connection dropped) is settled by the next call, before anything else.

        ``timeout=0`` raises ``ValueError``, as RQ's own ``dequeue_any`` does (it never
        blocks without end).

        Redis failing raises ``redis.ConnectionError``, on which RQ's worker waits, longer
        each time, and calls again: an outage, or an error Redis answered with (broken data
        in it, logged as an error here), which must hold the jobs, never run them unchecked.
        A job taken off RQ's list when it happened is settled by the next call.
        """
        if timeout == 0:
            raise ValueError(
                "timeout=0 would block forever, which RQ does not do: give a timeout > 0, "
                "or None not to block"
            )
        queues = list(queues)
        if not queues:
            return None
        dequeue = FairDequeue(
            queues,
            connection,
            job_class or cls.job_class,
            serializer,
            cls.namespace_for(queues[0]),
        )
        with HOLDING.moving_job():
            HOLDING.check_stop()
            try:
                found = dequeue.next(timeout)
            except (BackendUnavailable, BackendError) as exc:
                raise _for_rq(exc) from exc
        if found is not None:
            # A warm shutdown that waited for this move: the worker stops after this job.
            HOLDING.stop_deferred = False
        return found


def _for_rq(exc: BackendUnavailable | BackendError) -> RedisConnectionError:
    """Our error as the one RQ's worker loop retries with a growing pause (it stops the
    worker on any other)."""
    if isinstance(exc, BackendError):
        log.error(
            "queue-ratelimit: Redis answered with an error (%s): no job is taken until it is "
            "fixed (this is broken data or configuration in Redis, not an outage)",
            exc,
        )
    return RedisConnectionError(f"queue-ratelimit: {exc}")
