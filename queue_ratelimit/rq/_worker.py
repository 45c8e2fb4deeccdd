"""RQ workers that dequeue through ``queue_ratelimit.rq.Queue``."""

from __future__ import annotations

from typing import Any

import rq

from ._queue import Queue


def _fair_queues(queues: Any) -> Any:
    # `rq worker` builds plain rq.Queue objects before the worker exists: pass their names
    # so the worker builds fair queues instead.
    if isinstance(queues, (str, rq.Queue)):
        queues = [queues]
    return [q.name if type(q) is rq.Queue else q for q in queues]


def _fair_queue_class(queue_class: Any) -> Any:
    # `rq worker` passes its default queue class explicitly; a worker of ours replaces the
    # plain class with the fair one, and keeps any other (e.g. a subclass of ours).
    if queue_class in (None, rq.Queue, "rq.Queue", "rq.queue.Queue"):
        return Queue
    return queue_class


class Worker(rq.Worker):
    """``rq.Worker`` that fetches jobs in the fair scheduler's order within the budgets.

    ``rq worker -w queue_ratelimit.rq.Worker QUEUES...`` or ``queue-ratelimit rq worker``.
    """

    queue_class = Queue

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["queue_class"] = _fair_queue_class(kwargs.get("queue_class"))
        super().__init__(_fair_queues(queues), *args, **kwargs)


class SimpleWorker(rq.SimpleWorker):
    """``rq.SimpleWorker`` (no fork per job) with fair, rate-limited fetching."""

    queue_class = Queue

    def __init__(self, queues: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["queue_class"] = _fair_queue_class(kwargs.get("queue_class"))
        super().__init__(_fair_queues(queues), *args, **kwargs)
