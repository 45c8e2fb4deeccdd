"""``pause_and_retry``: a task whose downstream answered ``429 Retry-After`` pauses its scope
and hands itself back to the fair backlog, keeping its place, without counting as a failure
or a retry."""

from __future__ import annotations

import uuid
from typing import Any, NoReturn

from celery.exceptions import Ignore

from .._decision import Pause
from .._errors import ConfigError
from ._lane import HEADER_LANE, running_queue
from ._options import HEADER_FRONT, HEADER_HINT, HEADER_NONCE, gated, running_options
from ._runtime import runtime_of

# Shorthands for the scopes of the running task.
_OWN_SCOPES = ("tenant", "queue", "tenant_queue")


def own_scope(task: Any, scope: str) -> str:
    """``scope`` as a scope name: ``"tenant"``, ``"queue"`` and ``"tenant_queue"`` name the
    running task's own (its tenant as the gate read it: the default when the message has
    none or a malformed one; its queue as the gate found it, not the routing key);
    anything else is taken as a scope name as it is."""
    if scope not in _OWN_SCOPES:
        return scope
    request = task.request
    queue = running_queue(request, task.app.conf.task_default_queue)
    if scope == "queue":
        return f"queue:{queue}"
    runtime = runtime_of(task.app)
    if runtime is None:
        raise ConfigError(f"{task.name}: queue-ratelimit is not installed on its app")
    tenant = running_options(request, runtime.settings).tenant
    return f"tenant:{tenant}" if scope == "tenant" else f"tenant:{tenant}:queue:{queue}"


def pause_and_retry(task: Any, seconds: float, *, scope: str = "tenant") -> NoReturn:
    """Pause ``scope`` for ``seconds`` across every worker, and hand this task back.

    For a task whose downstream answered ``429 Retry-After``::

        @app.task(bind=True)
        def sync(self, account):
            response = partner.post(...)
            if response.status_code == 429:
                pause_and_retry(self, float(response.headers["Retry-After"]))

    Nothing of the scope is admitted until the pause ends (``Limiter.pause``: on Redis's
    clock, only ever lengthened by another task's shorter ``Retry-After``). The task is
    published again with its id, arguments and retry count unchanged, and marked to go to
    the head of its class in the fair backlog, where the pause parks it: it runs first of
    its tenant's waiting work once the pause ends. This execution then ends with Celery's
    ``Ignore``: no state is stored for it, its message is acknowledged, and neither
    ``max_retries`` nor the failure counters see it. (As with ``Task.retry``, a worker
    killed between the publish and the acknowledgement of an ``acks_late`` task leaves
    both copies: that task may run twice.)

    Args:
        task: the bound task (``self``).
        seconds: how long to pause, at most 30 days.
        scope: ``"tenant"`` (the task's tenant, the default), ``"queue"``,
            ``"tenant_queue"``, or any scope name (``"global"``, ``"priority:low"``...).

    Raises:
        celery.exceptions.Ignore: always, once the task is handed back.
        ConfigError: queue-ratelimit is not installed on the app, the task is not running
            in a worker, it opts out of the gate (``rate_gate=False``: nothing would hold
            its copy back), or the pause is refused (a bad scope or length); nothing is
            paused then.
        TooManyPauses: a new pause while the namespace runs the most it may: nothing is
            paused and the task is not handed back (it fails, or retries if it asks to).
    """
    runtime = runtime_of(task.app)
    if runtime is None:
        raise ConfigError("pause_and_retry needs queue_ratelimit.celery.install(app)")
    request = task.request
    if getattr(request, "called_directly", True):
        raise ConfigError("pause_and_retry hands back a task running in a worker")
    if not gated(task):
        # Nothing would hold the copy back: it would run again at once, call the downstream
        # that said 429, and hand itself back again, as fast as the worker goes.
        raise ConfigError(
            f"{task.name} is not gated (rate_gate=False): no pause holds it back; "
            f"use pause_scope and Task.retry(countdown=...)"
        )
    pause_scope(task, seconds, scope)
    hand_back(task)


def hand_back(task: Any) -> NoReturn:
    """Publish the running task again, marked for the head of its class in the fair
    backlog, and end this execution with ``Ignore`` (see ``pause_and_retry``)."""
    request = task.request
    # (The gate that takes the copy writes its own lane.)
    dropped = (HEADER_HINT, HEADER_NONCE, HEADER_LANE)
    headers = {k: v for k, v in (request.headers or {}).items() if k not in dropped}
    # A new nonce: this is a new publish of the task, not a redelivery of the one running.
    headers[HEADER_NONCE] = uuid.uuid4().hex
    headers[HEADER_FRONT] = "1"
    runtime = runtime_of(task.app)
    if runtime is not None:
        # The options the gate ran it with: another producer's malformed header would make
        # the publish hook refuse the copy, after the pause was set (the task then failed).
        headers.update(running_options(request, runtime.settings).headers())
    task.signature_from_request(request, headers=headers).apply_async()
    raise Ignore()


def pause_scope(task: Any, seconds: float, scope: str = "tenant") -> Pause:
    """Pause a scope of the running task (as ``pause_and_retry``) without handing it back."""
    runtime = runtime_of(task.app)
    if runtime is None:
        raise ConfigError("pause_scope needs queue_ratelimit.celery.install(app)")
    return runtime.limiter.pause(own_scope(task, scope), seconds, actor=f"celery:{task.name}")
