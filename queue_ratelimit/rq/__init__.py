"""RQ integration: a queue that carries rate options and workers that fetch fairly.

::

    from redis import Redis
    from queue_ratelimit.rq import Queue

    queue = Queue("emails", connection=Redis())
    job = queue.enqueue(send_email, "a@example.com", rate_tenant="acme", rate_priority="high")
    job.rate_hint  # Hint(allowed=True, wait_ms=0.0, denied_by=None, backlog=0, concurrency=False)

Then start workers with ``queue-ratelimit rq worker emails`` (the same flags as
``rq worker``), or ``rq worker -w queue_ratelimit.rq.Worker emails``.
"""

from ._options import OPTIONS, scheduler_for
from ._pause import PauseRequested, pause_and_requeue, pause_current_scope
from ._queue import Queue
from ._worker import SimpleWorker, Worker

__all__ = [
    "OPTIONS",
    "PauseRequested",
    "Queue",
    "SimpleWorker",
    "Worker",
    "pause_and_requeue",
    "pause_current_scope",
    "scheduler_for",
]
