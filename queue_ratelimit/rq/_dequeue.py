"""RQ's fair dequeue: the next job in weighted-fair order that every bucket admits.

Jobs wait in two places: RQ's own list of each queue (where plain ``rq.Queue`` producers,
RQ's scheduler and our ``Queue`` while it is uncontended put them) and the fair backlog in
Redis. A worker moves what waits on RQ's list into the backlog in bulk ("adopt"), so every
waiting job takes part in the fair order whatever put it there, then takes jobs from the
backlog with ``FairScheduler.dispatch``, which hands each one into RQ's own bookkeeping in
the same atomic step. A job arriving at an idle worker is taken straight off RQ's list and
gated on its own: the cheap path while nothing is contended.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rq.exceptions import DequeueTimeout, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import resolve_serializer

from .._scheduler import FairScheduler
from .._scopes import _shown
from .._throttle_log import ThrottleLog
from ._handover import HOLDING, LOST_REPLY, Claim
from ._options import log_interval, scheduler_for, slot_keeper, stored_rate_options

log = logging.getLogger("queue_ratelimit.rq")

# Longest a worker blocks before it looks at the fair backlog again (seconds): parked work
# that became admissible elsewhere is noticed at least this often.
POLL_INTERVAL = 0.5
# The same while the backlog holds work: a concurrency slot given back by another worker
# (nothing wakes this one) is taken up within this long.
CONTENDED_POLL = 0.1
# Jobs moved from one of RQ's lists into the backlog per step (one atomic call).
ADOPT_BATCH = 200
# How often a busy worker looks for jobs waiting on RQ's lists (seconds): such a job joins
# the fair order at most this late. An idle worker looks every time it finds nothing.
ADOPT_INTERVAL = 0.05

# (connection, queue key) of single-queue workers that last found the queue's backlog empty.
_IDLE_BACKLOG: set[tuple[int, str]] = set()
# (connection, queue keys) -> monotonic time of the last look at RQ's lists.
_LAST_ADOPT: dict[tuple[int, tuple[str, ...]], float] = {}
# Rate options of jobs seen waiting on RQ's lists, by job id (None: the job was gone), so a
# job's meta is read once however often the worker looks; cleared past OPTIONS_SEEN_MAX.
_OPTIONS_SEEN: dict[str, tuple[str, str, float] | None] = {}
OPTIONS_SEEN_MAX = 10_000

Found = tuple[Job, Any]

# What this process's worker held back, summarised at INFO on RQ's worker logger (the one
# `rq worker` shows at INFO), made on first use: it reads the interval from the environment.
_THROTTLE: list[ThrottleLog] = []


def throttle_log() -> ThrottleLog:
    if not _THROTTLE:
        _THROTTLE.append(ThrottleLog(logging.getLogger("rq.worker"), log_interval()))
    return _THROTTLE[0]


class FairDequeue:
    """One worker's view of its queues for a dequeue: what to ask Redis and in what order.

    Args:
        queues: the worker's queues (our ``Queue`` objects), in RQ's priority order.
        connection: their Redis connection.
        job_class / serializer: how to load jobs.
        namespace: the limiter namespace.
    """

    def __init__(
        self, queues: list[Any], connection: Any, job_class: Any, serializer: Any, namespace: str
    ) -> None:
        self.queues = queues
        self.by_name = {q.name: q for q in queues}
        self.connection = connection
        self.job_class = job_class
        self.serializer = serializer
        self.scheduler: FairScheduler = scheduler_for(connection, namespace)
        self.slots = slot_keeper(self.scheduler)
        # RQ removes a job from its intermediate list only for single-queue workers, so the
        # backlog hands over onto that list only then (multi-queue workers pop plainly too).
        self.single = len(queues) == 1
        self.handoff = {q.name: q.intermediate_queue_key for q in queues} if self.single else None
        self.receipt_key = self.scheduler.receipt_key(HOLDING.owner())
        self.idle_key = (id(connection), queues[0].key)
        self.adopt_key = (id(connection), tuple(q.key for q in queues))

    # -- the loop ------------------------------------------------------------------------
    def next(self, timeout: int | None) -> Found | None:
        """The next job to run and its queue; None when there is none and no timeout (burst
        mode); ``DequeueTimeout`` when the timeout runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if HOLDING.claims(self.connection):
            found = self._settle_claims()
            if found is not None:
                return found
        self._adopt_now_and_then()
        # A single queue whose fair backlog was empty last time: RQ's list first, which
        # saves the dispatch call per job while the queue is uncontended. The gate still
        # parks a job if a backlog has formed since, and then the backlog goes first again.
        if self.single and self.idle_key in _IDLE_BACKLOG:
            found, _moved = self._from_plain_lists()
            if found is not None:
                return found
            _IDLE_BACKLOG.discard(self.idle_key)
        throttled = throttle_log()
        while True:
            HOLDING.check_stop()
            throttled.report(self.scheduler, self.by_name)
            batch = self._dispatch()
            for held in batch.held_back:  # (parked jobs meet their budgets here)
                throttled.held_back(held.queue, held.tenant, held.binding)
            for n, item in enumerate(batch.items):
                queue = self.by_name[item.queue]
                self.slots.keep(item.id, item.slot)
                try:
                    found = self._take(queue, item.id, self.single)
                except LOST_REPLY:
                    for rest in batch.items[n:]:
                        HOLDING.claim(
                            self.connection, Claim(rest.queue, rest.id, listed=self.single)
                        )
                    raise
                if found is not None:
                    return found
            if batch.items:
                continue
            # Nothing admissible in the backlog: jobs on RQ's lists join it first (several
            # waiting there means the queue is contended), else the next one is gated alone.
            if self._adopt():
                continue
            if self.single and batch.wait_ms is None:
                _IDLE_BACKLOG.add(self.idle_key)
            found, progressed = self._from_plain_lists()
            if found is not None:
                return found
            if progressed:
                continue
            if batch.wait_ms is not None:
                throttled.waited()
            wait = None if batch.wait_ms is None else min(batch.wait_ms / 1000, CONTENDED_POLL)
            # Waiting for tokens (the backlog is not empty), a pause, not a BLMOVE on RQ's
            # list: Redis ends a blocking command's timeout on its own clock tick (hz 10:
            # a 25 ms timeout returned after 100 ms, median), which made every throttled
            # wait up to 100 ms longer, and lost each returning token to any other caller
            # of the same budget (a Celery queue sharing a tenant: docs/reliability.md).
            # A job pushed meanwhile waits at most CONTENDED_POLL for the next look.
            if deadline is None:
                if wait is None:
                    return None
                HOLDING.pause(max(wait, 0.001))
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise DequeueTimeout(timeout, [q.key for q in self.queues])
            block = min(left, POLL_INTERVAL if wait is None else max(wait, 0.001))
            if self.single and wait is None:
                # Blocks while holding nothing, but a warm shutdown waits for it (at most
                # POLL_INTERVAL): a job it moves must not be left behind.
                queue = self.queues[0]
                job_id = self.connection.blmove(queue.key, queue.intermediate_queue_key, block)
                if job_id is not None and HOLDING.stop_deferred:
                    self._put_back(queue, _text(job_id))
                    HOLDING.check_stop()  # raises StopRequested: stop as RQ would, idle
                if job_id is not None:
                    found = self._gate_popped(queue, _text(job_id), True)
                    if found is not None:
                        return found
            else:
                HOLDING.pause(block)

    def _put_back(self, queue: Any, job_id: str) -> None:
        """Return a job taken while a warm shutdown waited to the head of its queue, as
        if it had never been taken: RQ's idle worker stops at once and takes nothing."""
        pipe = self.connection.pipeline(transaction=True)
        pipe.lrem(queue.intermediate_queue_key, 1, job_id)
        pipe.lpush(queue.key, job_id)
        pipe.execute()

    def _dispatch(self) -> Any:
        nonce = HOLDING.nonce()
        try:
            return self.scheduler.dispatch(
                list(self.by_name),
                with_payload=False,
                hand_over=True,
                handoff_lists=self.handoff,
                receipt=(self.receipt_key, nonce),
            )
        except LOST_REPLY:
            HOLDING.claim(self.connection, Claim(None, None, nonce=nonce, listed=self.single))
            raise

    # -- RQ's own lists ------------------------------------------------------------------
    def _adopt_now_and_then(self) -> None:
        """Look at RQ's lists if this worker has not for ``ADOPT_INTERVAL``: a busy worker
        that always finds work in the backlog still brings newcomers into the fair order."""
        if time.monotonic() - _LAST_ADOPT.get(self.adopt_key, 0.0) >= ADOPT_INTERVAL:
            self._adopt()

    def _adopt(self) -> bool:
        """Move the jobs waiting on RQ's lists into the fair backlog, oldest first, up to
        ``ADOPT_BATCH`` per queue; True when any moved.

        Only where the order matters: a short list (all of it seen) of jobs of one class
        (tenant and priority) on a queue whose backlog is empty is already in fair order
        (FIFO), and stays on RQ's list as RQ would keep it (``queue.job_ids``,
        ``enqueue_at_front``, positions). A longer list is moved whatever its head holds:
        another tenant's jobs may wait further down.
        """
        _LAST_ADOPT[self.adopt_key] = time.monotonic()
        pipe = self.connection.pipeline(transaction=False)
        # (One backlog-size hash per shard of a sharded namespace: their sum.)
        counts = [self.scheduler.counts_keys(queue.name) for queue in self.queues]
        for queue, keys in zip(self.queues, counts, strict=True):
            pipe.lrange(queue.key, 0, ADOPT_BATCH - 1)
            pipe.llen(queue.key)
            for key in keys:
                pipe.hget(key, ":total")
        replies = iter(pipe.execute())
        moved = False
        for queue, keys in zip(self.queues, counts, strict=True):
            ids, length = next(replies), next(replies)
            backlog = sum(int(next(replies) or 0) for _ in keys)
            if not ids or (length == 1 and backlog == 0):
                continue  # a lone job on an idle queue: the gate takes it (the cheap path)
            jobs = self._rate_options_of([_text(i) for i in ids])
            classes = {(tenant, priority) for _, tenant, priority, _ in jobs if tenant}
            if backlog == 0 and length <= ADOPT_BATCH and len(classes) <= 1:
                continue
            moved = self.scheduler.adopt(queue.name, queue.key, jobs) > 0 or moved
        return moved

    def _rate_options_of(self, ids: list[str]) -> list[tuple[str, str | None, str, float]]:
        """Each job's (id, tenant, priority, cost) from its meta, read once per job (then
        remembered); tenant None: the job is gone. Malformed options are logged and
        replaced by the defaults."""
        unknown = [i for i in ids if i not in _OPTIONS_SEEN]
        if unknown:
            pipe = self.connection.pipeline(transaction=False)
            for job_id in unknown:
                pipe.hmget(self.job_class.key_for(job_id), "meta", "status")
            serializer = resolve_serializer(self.serializer)
            if len(_OPTIONS_SEEN) + len(unknown) > OPTIONS_SEEN_MAX:
                _OPTIONS_SEEN.clear()
            for job_id, (raw_meta, status) in zip(unknown, pipe.execute(), strict=True):
                if status is None:
                    _OPTIONS_SEEN[job_id] = None
                    continue
                try:
                    meta = serializer.loads(raw_meta) if raw_meta else {}
                except Exception as exc:  # a meta its serializer cannot read: RQ fails it
                    log.error("queue-ratelimit: job %s has unreadable meta: %r", job_id, exc)
                    meta = {}
                _OPTIONS_SEEN[job_id] = stored_rate_options(meta, job_id)
        found: list[tuple[str, str | None, str, float]] = []
        for job_id in ids:
            options = _OPTIONS_SEEN.get(job_id)
            if options is None:
                _OPTIONS_SEEN.pop(job_id, None)  # gone: look again if the id comes back
                found.append((job_id, None, "normal", 1.0))
            else:
                found.append((job_id, *options))
        return found

    def _from_plain_lists(self) -> tuple[Found | None, bool]:
        """Pop RQ's own lists in queue order; returns (job to run, whether anything moved)."""
        progressed = False
        for queue in self.queues:
            if self.single:
                job_id = self.connection.lmove(queue.key, queue.intermediate_queue_key)
            else:
                job_id = self.connection.lpop(queue.key)
            if job_id is None:
                continue
            progressed = True
            found = self._gate_popped(queue, _text(job_id), self.single)
            if found is not None:
                return found, True
        return None, progressed

    def _gate_popped(self, queue: Any, job_id: str, in_intermediate: bool) -> Found | None:
        """``_admit_plain``, leaving a claim on the job if a reply is lost on the way."""
        try:
            return self._admit_plain(queue, job_id, in_intermediate)
        except LOST_REPLY:
            HOLDING.claim(
                self.connection, Claim(queue.name, job_id, gated=False, listed=in_intermediate)
            )
            raise

    def _admit_plain(self, queue: Any, job_id: Any, in_intermediate: bool) -> Found | None:
        """Gate a job popped from a plain list: run it, or park it in the backlog."""
        job = self._fetch(job_id)
        if job is None:
            if in_intermediate:
                self.connection.lrem(queue.intermediate_queue_key, 1, job_id)
            return None
        tenant, priority, cost = stored_rate_options(job.meta, job.id)
        scheduler = self.scheduler
        verdict = scheduler.gate(tenant, job.id, queue=queue.name, priority=priority, cost=cost)
        if verdict.action == "run":
            self.slots.keep(job.id, verdict.slot)
            return job, queue
        if verdict.action == "park":
            # Into Redis first, then off RQ's list: a crash in between leaves a copy that
            # the next gate recognises as a duplicate, never a lost job.
            scheduler.submit(tenant, job.id, queue=queue.name, priority=priority, cost=cost)
            throttle_log().parked(queue.name, tenant, verdict.binding)
        if in_intermediate:
            self.connection.lrem(queue.intermediate_queue_key, 1, job.id)
        return None

    # -- jobs handed over --------------------------------------------------------------------
    def _take(self, queue: Any, job_id: str, listed: bool) -> Found | None:
        """A dispatched job, to run unless it was cancelled or deleted while it waited."""
        job = self._fetch(job_id)
        if job is not None and job.get_status(refresh=False) == JobStatus.QUEUED:
            return job, queue
        self.slots.release(job_id)  # it will not run
        if listed:
            self.connection.lrem(queue.intermediate_queue_key, 1, job_id)
        return None

    def _settle_claims(self) -> Found | None:
        """Settle the jobs this process may hold after a lost reply: run one, or put back.

        Only this process knows of such a job: no other worker takes a job off RQ's
        intermediate list, and a receipt names the caller it was written for.
        """
        connection = self.connection
        for claim in HOLDING.claims(connection):
            if claim.job_id is None:  # a dispatch whose reply was lost: what did it hand over?
                raw = connection.get(self.receipt_key)
                words = _text(raw).split() if raw is not None else []
                handed = words[1:] if words[:1] == [claim.nonce] else []
                HOLDING.settle(
                    connection,
                    claim,
                    *(Claim(None, i, gated=True, listed=claim.listed) for i in handed),
                )
        for claim in HOLDING.claims(connection):
            job = self._fetch(claim.job_id)
            queue = self.by_name.get(claim.queue or (job.origin if job is not None else ""))
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
            found = self._gate_popped(queue, job.id, claim.listed)
            HOLDING.settle(connection, claim)
            if found is not None:
                return found
        return None

    def _fetch(self, job_id: Any) -> Job | None:
        text = _text(job_id)
        try:
            return self.job_class.fetch(
                text, connection=self.connection, serializer=self.serializer
            )
        except NoSuchJobError:
            return None
        except ValueError as exc:
            # Not an RQ job id (RQ refuses to load it): someone else's work parked under
            # this queue's name in this namespace, e.g. a Celery queue of the same name.
            # RQ cannot run it; raising would stop this worker, and every worker after it.
            log.error(
                "queue-ratelimit: dropping %s from the fair backlog of this RQ queue: not an RQ "
                "job id (%s); give Celery and RQ queues different names in one namespace",
                _shown(text),
                exc,
            )
            return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
