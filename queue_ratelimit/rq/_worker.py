"""RQ workers that dequeue through ``queue_ratelimit.rq.Queue``."""

from __future__ import annotations

from typing import Any

import rq
from rq.rate_limit import release_slot
from rq.worker import WorkerStatus

from .._durability import persistence_warning
from ._handover import HOLDING
from ._options import scheduler_for, slot_keeper
from ._pause import PauseRequested
from ._queue import Queue

# RQ's own queue class, as it was when this module was imported: rebinding ``rq.Queue``
# later (a harness that swaps our classes in for RQ's) does not make ours look plain.
_RQ_QUEUE = rq.Queue
_RQ_QUEUE_NAMES = ("rq.Queue", "rq.queue.Queue")


def _fair_queues(queues: Any) -> Any:
    # `rq worker` builds plain rq.Queue objects before the worker exists: pass their names
    # so the worker builds them with its own queue class instead.
    if isinstance(queues, (str, _RQ_QUEUE)):
        queues = [queues]
    return [q.name if type(q) is _RQ_QUEUE else q for q in queues]


def _fair_queue_class(queue_class: Any, default: Any) -> Any:
    """The queue class a worker of ours uses: the one given as an argument, except RQ's
    plain class, which `rq worker` passes when none was asked for; then ``default``, the
    worker class's own ``queue_class`` (ours, or whatever a subclass sets)."""
    if queue_class is None or queue_class is _RQ_QUEUE or queue_class in _RQ_QUEUE_NAMES:
        return default
    return queue_class


class _WaitsForHandover:
    """A warm shutdown that arrives while a job is being moved into RQ's hands waits for the
    move to end (then the worker stops after that job), instead of stranding the job; and
    the worker warns at start when the Redis holding parked jobs keeps nothing on disk or
    may evict keys."""

    def work(self, *args: Any, **kwargs: Any) -> bool:
        worker: Any = self
        warning = persistence_warning(worker.connection)
        if warning:
            worker.log.warning("queue-ratelimit: %s", warning)
        # The eviction policy ($QUEUE_RATELIMIT_EVICTION: warn, or refuse to start) and work
        # left by an older key layout, now rather than at the first script call.
        for namespace in {Queue.namespace_for(q) for q in worker.queues}:
            scheduler_for(worker.connection, namespace).limiter._scripts.run_checks()
        return bool(super().work(*args, **kwargs))  # type: ignore[misc]

    def execute_job(self, job: Any, queue: Any) -> Any:
        """Run the job (RQ's way); then give back the concurrency slots it was admitted
        with, whatever the outcome (success, failure, a retry, a stopped horse)."""
        try:
            return super().execute_job(job, queue)  # type: ignore[misc]
        finally:
            namespace = Queue.namespace_for(queue)
            worker: Any = self
            slot_keeper(scheduler_for(worker.connection, namespace)).release(job.id)

    def _finalize_failure(self, job: Any, queue: Any, execution: Any, exc_info: Any) -> None:
        """A job that raised ``PauseRequested`` (``pause_and_requeue``) goes back to the head
        of its queue, queued, rather than failing: no failure callback, no failed-job count,
        no retry used. (RQ 3 calls this in the work horse for every job that raised.)"""
        if not isinstance(exc_info[1], PauseRequested):
            super()._finalize_failure(job, queue, execution, exc_info)  # type: ignore[misc]
            return
        worker: Any = self
        worker.handle_execution_ended(job, queue, job.failure_callback_timeout)
        with worker.connection.pipeline() as pipe:
            worker.cleanup_execution(job, pipeline=pipe, execution=execution)
            # Through our queue: into the fair backlog's head of its class when contended
            # (the pause makes it so for a paused tenant), else the head of RQ's list.
            queue._enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.execute()
        release_slot(job)  # RQ's own concurrency slot, as a retry gives it back
        worker.log.info("Job %s: handed back (%s)", job.id, exc_info[1])

    def _shutdown(self) -> None:
        worker: Any = self
        if worker.get_state() != WorkerStatus.BUSY and HOLDING.defer_stop():
            # What RQ does for a busy worker: stop after the job in hand.
            worker._stop_requested = True
            worker.set_shutdown_requested_date()
            if worker.scheduler:
                worker.stop_scheduler()
            worker.log.info("Worker %s: stopping once the job being fetched is handed over",
                            worker.name)  # fmt: skip
            return
        super()._shutdown()  # type: ignore[misc]


class Worker(_WaitsForHandover, rq.Worker):
    """``rq.Worker`` that fetches jobs in the fair scheduler's order within the budgets.

    ``rq worker -w queue_ratelimit.rq.Worker QUEUES...`` or ``queue-ratelimit rq worker``.
    """

    queue_class = Queue

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["queue_class"] = _fair_queue_class(kwargs.get("queue_class"), self.queue_class)
        super().__init__(_fair_queues(queues), *args, **kwargs)


class SimpleWorker(_WaitsForHandover, rq.SimpleWorker):
    """``rq.SimpleWorker`` (no fork per job) with fair, rate-limited fetching."""

    queue_class = Queue

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["queue_class"] = _fair_queue_class(kwargs.get("queue_class"), self.queue_class)
        super().__init__(_fair_queues(queues), *args, **kwargs)
