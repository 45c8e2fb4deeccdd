"""Pytest plugin for Celery's integration tests in tests/celery_suite/run.py (every mode).

- One worker, so control replies are awaited from one node only (``limit=1``): stock
  Celery waits out the whole reply timeout (1 to 3 s) on every ping and in every test's
  teardown, which is most of the suite's time and says nothing about the tasks. Both modes
  get the same change.
- ``QRL_CELERY_SUITE_INSTALL=1``: ``queue_ratelimit.celery.install`` on the session
  worker's app just before the worker starts (Celery's ``test_worker_starting`` signal),
  with the limits in ``QRL_CELERY_SUITE_LIMITS`` (JSON, ``{"tenant:*": {"rate": "5/s",
  "burst": 5}}``; ``{}``: none), in a Redis database of the run's own
  (``QRL_CELERY_SUITE_REDIS``). Its publish hook is a process-wide signal receiver, so
  what the tests publish with their own apps gets the rate headers and the nonce too, as
  the worker's own publishes do (``Task.replace``, chain and chord continuations).
- Celery's harness purges the broker between tests (``Manager.wait_until_idle`` calls
  ``control.purge()`` until it returns 0) with the tests' own app, which has no ``install``
  (the session worker's app has). With the plugin installed, that purge also purges the
  installed app's fair backlog, as ``app.control.purge()`` of an installed app does: what a
  user who installs the plugin on the app they purge with gets.
- When the worker stops, the gate's counters (parked, re-admitted, duplicates dropped...)
  are written to ``QRL_CELERY_SUITE_STATS`` (JSON), so the run can show that the limit
  bound and that nothing was dropped.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery.app import control
from celery.contrib.testing.worker import test_worker_starting, test_worker_stopped

_inspect_init = control.Inspect.__init__


def _one_reply_inspect(self: Any, *args: Any, **kwargs: Any) -> None:
    _inspect_init(self, *args, **kwargs)
    if self.limit is None and self.destination is None:
        self.limit = 1


control.Inspect.__init__ = _one_reply_inspect  # type: ignore[method-assign]


_installed: list[Any] = []
_broker_purge = control.Control.purge


def _purge_with_backlog(self: Any, connection: Any = None) -> int:
    count = int(_broker_purge(self, connection) or 0)
    if _installed:
        from queue_ratelimit.celery import purge

        count += sum(purge(app) for app in _installed if app is not self.app)
    return count


control.Control.purge = _purge_with_backlog  # type: ignore[method-assign]


def _install(sender: Any = None, **_: Any) -> None:
    if os.environ.get("QRL_CELERY_SUITE_INSTALL") != "1" or sender is None:
        return
    from queue_ratelimit.celery import install

    _installed.append(sender)

    limits = json.loads(os.environ.get("QRL_CELERY_SUITE_LIMITS") or "{}")
    install(
        sender,
        redis_url=os.environ["QRL_CELERY_SUITE_REDIS"],
        namespace="celerysuite",
        limits={"limits": limits} if limits else {},
    )


def _gate_stats(worker: Any) -> dict[str, Any] | None:
    from queue_ratelimit.celery import RateLimitGate

    consumer = getattr(worker, "consumer", None)
    steps = getattr(getattr(consumer, "blueprint", None), "steps", {}) or {}
    for step in steps.values():
        if isinstance(step, RateLimitGate) and step.enabled:
            return {**step.stats, "held": len(step.held), "waiting": len(step.waiting)}
    return None


def _write_stats(sender: Any = None, worker: Any = None, **_: Any) -> None:
    path = os.environ.get("QRL_CELERY_SUITE_STATS")
    if not path or worker is None or os.environ.get("QRL_CELERY_SUITE_INSTALL") != "1":
        return
    with open(path, "w", encoding="utf-8") as out:
        json.dump(_gate_stats(worker), out)


test_worker_starting.connect(_install, weak=False)
test_worker_stopped.connect(_write_stats, weak=False)
