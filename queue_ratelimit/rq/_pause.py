"""``pause_and_requeue``: an RQ job whose downstream answered ``429 Retry-After`` pauses its
scope and goes back to the head of its queue, without counting as a failure or a retry."""

from __future__ import annotations

from typing import Any, NoReturn

from rq import get_current_job

from .._decision import Pause
from .._errors import ConfigError, RateLimitError
from ._options import scheduler_for, stored_rate_options
from ._queue import Queue

# Shorthands for the scopes of the running job.
_OWN_SCOPES = ("tenant", "queue", "tenant_queue")


class PauseRequested(RateLimitError):
    """Raised by ``pause_and_requeue`` inside a job: the worker (``queue_ratelimit.rq.Worker``
    or ``SimpleWorker``) puts the job back at the head of its queue instead of failing it.

    Attributes:
        pause: the pause in place (it may be longer than asked: pauses only grow).
    """

    def __init__(self, pause: Pause) -> None:
        super().__init__(f"{pause.scope} paused for {pause.remaining:.3f}s: job handed back")
        self.pause = pause


def _own_scope(job: Any, scope: str) -> str:
    if scope not in _OWN_SCOPES:
        return scope
    queue = job.origin
    if scope == "queue":
        return f"queue:{queue}"
    tenant, _, _ = stored_rate_options(job.meta, job.id)
    return f"tenant:{tenant}" if scope == "tenant" else f"tenant:{tenant}:queue:{queue}"


def pause_current_scope(seconds: float, *, scope: str = "tenant") -> Pause:
    """Pause a scope of the running job (as ``pause_and_requeue``) without handing it back."""
    job = get_current_job()
    if job is None:
        raise ConfigError("pause_current_scope works inside a running RQ job")
    namespace = Queue.namespace_for(None)
    limiter = scheduler_for(job.connection, namespace).limiter
    return limiter.pause(_own_scope(job, scope), seconds, actor=f"rq:{job.func_name}")


def pause_and_requeue(seconds: float, *, scope: str = "tenant") -> NoReturn:
    """Pause ``scope`` for ``seconds`` across every worker, and hand the running job back.

    For a job whose downstream answered ``429 Retry-After``::

        def sync(account):
            response = partner.post(...)
            if response.status_code == 429:
                pause_and_requeue(float(response.headers["Retry-After"]))

    Nothing of the scope is admitted until the pause ends (``Limiter.pause``: on Redis's
    clock). The worker (``queue_ratelimit.rq.Worker`` or ``SimpleWorker``, RQ 3) then puts
    the job back at the head of its queue (the fair backlog's head of its class when the
    queue is contended), with status ``queued``: no failure is recorded, no retry is
    used, no failure callback runs, and the worker's failed-job count is unchanged. Any
    other worker class fails the job with ``PauseRequested``.

    Args:
        seconds: how long to pause, at most 30 days.
        scope: ``"tenant"`` (the job's tenant, the default), ``"queue"``,
            ``"tenant_queue"``, or any scope name (``"global"``, ``"priority:low"``...).
            The namespace is the workers' (``$QUEUE_RATELIMIT_NAMESPACE`` or the queue
            class's ``rate_namespace``).

    Raises:
        PauseRequested: always, once the pause is in place.
        ConfigError: not inside a running RQ job, or the pause is refused.
        TooManyPauses: a new pause while the namespace runs the most it may (nothing
            paused; the job fails as for any other error).
    """
    raise PauseRequested(pause_current_scope(seconds, scope=scope))
