"""Celery integration: ``install(app)`` and every worker enforces the budgets fairly.

::

    from celery import Celery
    from queue_ratelimit.celery import install

    app = Celery("proj", broker="redis://localhost:6379/0")
    install(app, limits={"limits": {"global": "500/s", "tenant:*": "50/s"}})

    @app.task
    def send_email(to): ...

    send_email.apply_async(("a@example.com",), rate_tenant="acme", rate_priority="high")

Workers start as usual (``celery -A proj worker``) and pick the gate up from the app.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import before_task_publish, worker_init

from .._errors import BackendError, BackendUnavailable
from .._scheduler import Hint
from . import _inspect  # noqa: F401 (registers `celery inspect qrl_gate`)
from ._gate import RateLimitGate
from ._options import GATE_ATTRIBUTE
from ._pause import pause_and_retry, pause_scope
from ._pause_check import guard_tasks
from ._producer import RateLimitedTask, last_hint, make_publish_handler
from ._purge import purge, purge_backlog_with_broker
from ._runtime import APP_ATTRIBUTE, Runtime, runtime_of
from ._settings import CelerySettings

__all__ = [
    "METRICS_TASK",
    "CelerySettings",
    "Hint",
    "RateLimitGate",
    "RateLimitedTask",
    "install",
    "last_hint",
    "pause_and_retry",
    "pause_scope",
    "purge",
    "runtime_of",
]

log = logging.getLogger("queue_ratelimit.celery")
METRICS_TASK = "queue_ratelimit.publish_metrics"


def install(
    app: Any, redis_url: str | None = None, namespace: str | None = None, **options: Any
) -> Runtime:
    """Enable rate limiting on ``app``: the publish hook, the worker gate, the metrics task.

    Settings come from ``app.conf.queue_ratelimit`` (a dict) and are overridden by the
    keyword arguments; see ``CelerySettings`` for each. Calling it again returns the same
    runtime.

    Raises:
        ConfigError: unknown or invalid settings, or no Redis URL to be found.
    """
    existing = runtime_of(app)
    if existing is not None:
        return existing
    settings = CelerySettings.from_app(
        app, {"redis_url": redis_url, "namespace": namespace, **options}
    )
    runtime = Runtime(app, settings)
    setattr(app, APP_ATTRIBUTE, runtime)

    # Tasks built after this point validate rate options at the call site and can apply
    # the "reject" policy; an app whose Task class already exists keeps it (the publish
    # hook still does everything else).
    if "Task" not in app.__dict__ and app.task_cls in (None, "celery.app.task:Task"):
        app.task_cls = f"{RateLimitedTask.__module__}:{RateLimitedTask.__name__}"

    handler = make_publish_handler(app)
    runtime.publish_handler = handler  # type: ignore[attr-defined]  # keep it referenced
    before_task_publish.connect(handler, weak=False, dispatch_uid=f"queue_ratelimit:{id(app)}")
    app.steps["consumer"].add(RateLimitGate)
    # Celery's purge empties the broker; the tasks workers parked are purged with it.
    if not purge_backlog_with_broker(app):
        log.info(
            "queue-ratelimit: %s has a control class of its own: app.control.purge() leaves "
            "parked tasks in the backlog (use queue_ratelimit.celery.purge)",
            app.main,
        )

    # With strict_pauses, work admitted before a pause looks for it as it starts
    # (_pause_check): the tasks are guarded as the worker starts, before its pool's
    # processes are made. Off by default: it costs a round trip per task.
    def guard(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is app:
            guard_tasks(app)

    if settings.strict_pauses:
        worker_init.connect(guard, weak=False, dispatch_uid=f"queue_ratelimit:guard:{id(app)}")

    # shared=False: a shared task would be added to every other app of the process too,
    # bound to this app's runtime.
    @app.task(name=METRICS_TASK, ignore_result=True, shared=False, **{GATE_ATTRIBUTE: False})
    def publish_metrics() -> dict[str, Any]:
        """Publish the namespace's bucket state as a snapshot in Redis (beat runs it)."""
        from ..metrics import publish_snapshot

        snap = publish_snapshot(runtime.limiter)
        return {"allowed": snap["totals"]["allowed"], "denied": snap["totals"]["denied"]}

    schedule = dict(app.conf.beat_schedule or {})
    schedule.setdefault(METRICS_TASK, {"task": METRICS_TASK, "schedule": settings.metrics_interval})
    app.conf.beat_schedule = schedule

    if settings.limits:
        # Static limits seed Redis; what operators changed at run time is kept.
        try:
            runtime.limiter.apply_config(dict(settings.limits), actor="celery-install")
        except (BackendUnavailable, BackendError) as exc:
            # Importing the app must not fail because Redis is down (or broken); the gate
            # covers that and the next process to start seeds the limits.
            log.error("queue-ratelimit: could not seed limits into Redis: %s", exc)
    log.debug("queue-ratelimit installed on %s (%r)", app.main, settings)
    return runtime
