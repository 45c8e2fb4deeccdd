"""Purging: Celery's purge empties the broker's queues; work parked in the fair backlog has
been acknowledged to the broker already, so it is purged here (``purge``), and
``app.control.purge()`` of an installed app does both."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from celery.app.control import Control

from .._errors import ConfigError
from ._runtime import runtime_of


def _consumed_queues(app: Any) -> list[str]:
    """The queues Celery's own purge empties: those the app consumes from."""
    return sorted(app.amqp.queues.consume_from) or [app.conf.task_default_queue]


def purge(app: Any, queue: str | Iterable[str] | None = None, *, tenant: str | None = None) -> int:
    """Drop the work waiting in the fair backlog of ``app``'s queues (of one tenant, or all).

    Celery's ``celery purge`` and ``app.control.purge()`` empty the broker's queues only: a
    task a worker parked in the backlog has been acknowledged to the broker and would
    still run. Tasks in flight (handed back to a worker, reserved or running) are left
    alone, as Celery leaves the tasks its workers reserved.

    Args:
        queue: a queue name, several, or None for the queues Celery's purge empties (those
            the app consumes from).
        tenant: only this tenant's tasks.

    Returns:
        How many tasks were dropped.

    Raises:
        ConfigError: ``install`` was not called on ``app``.
        InvalidName: a malformed queue or tenant name.
        BackendUnavailable / BackendError: Redis is unreachable or answered with an error.
    """
    runtime = runtime_of(app)
    if runtime is None:
        raise ConfigError("queue_ratelimit.celery.install(app) was not called on this app")
    if queue is None:
        queues = _consumed_queues(app)
    else:
        queues = [queue] if isinstance(queue, str) else list(queue)
    scheduler = runtime.scheduler
    return sum(len(scheduler.purge(q, tenant=tenant)) for q in queues)


class BacklogControl(Control):
    """Celery's ``Control`` whose ``purge`` also drops the work parked in the backlog of the
    queues it purges (the count includes those tasks): the app's ``control_cls`` after
    ``install``."""

    def purge(self, connection: Any = None) -> int:
        count = int(super().purge(connection) or 0)
        return count + (purge(self.app) if runtime_of(self.app) is not None else 0)


_DEFAULT_CONTROL = "celery.app.control:Control"


def purge_backlog_with_broker(app: Any) -> bool:
    """Make ``app.control.purge()`` (a worker's ``--purge`` too) drop the parked work as
    well. False when the app has a control class of its own (use ``purge`` then)."""
    control = app.__dict__.get("control")
    if control is not None:  # already made: its purge is wrapped in place
        if not getattr(control.purge, "_qrl_backlog", False):
            broker_purge = control.purge

            @functools.wraps(broker_purge)
            def purge_both(connection: Any = None) -> int:
                return int(broker_purge(connection) or 0) + purge(app)

            purge_both._qrl_backlog = True  # type: ignore[attr-defined]
            control.purge = purge_both
        return True
    if app.control_cls in (None, _DEFAULT_CONTROL, Control):
        app.control_cls = f"{BacklogControl.__module__}:{BacklogControl.__name__}"
        return True
    return isinstance(app.control_cls, type) and issubclass(app.control_cls, BacklogControl)
