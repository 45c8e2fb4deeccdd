"""Purging a Celery app's fair backlog: ``queue_ratelimit.celery.purge`` and
``app.control.purge()`` of an installed app, without workers (the in-memory broker; the
backlog in a real Redis). End to end with a worker:
``tests/test_celery_e2e.py::test_control_purge_reaches_the_tasks_parked_in_the_backlog``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from queue_ratelimit import ConfigError, FairScheduler, Limiter

pytest.importorskip("celery")
from celery import Celery
from celery.app.control import Control
from celery.signals import before_task_publish

from queue_ratelimit.celery import install, purge


@pytest.fixture
def make_app(redis_url: str, namespace: str) -> Iterator[Callable[..., Any]]:
    apps: list[Any] = []

    def make(**kwargs: Any) -> Any:
        app = Celery("purge", broker="memory://", set_as_current=False, **kwargs)
        apps.append(app)
        return app

    yield make
    for app in apps:
        before_task_publish.disconnect(dispatch_uid=f"queue_ratelimit:{id(app)}")
        app.close()


def parked(limiter: Limiter, spread: dict[tuple[str, str], int]) -> FairScheduler:
    """Items parked in the backlog: ``spread`` maps (queue, tenant) to how many."""
    scheduler = FairScheduler(limiter)
    for (queue, tenant), count in spread.items():
        for i in range(count):
            assert scheduler.submit(tenant, f"{queue}.{tenant}.{i}", queue=queue, payload=b"m")
    return scheduler


SPREAD = {("celery", "a"): 3, ("celery", "b"): 2, ("other", "a"): 4}


@pytest.mark.parametrize(
    ("queue", "tenant", "dropped", "left"),
    [
        (None, None, 5, {"celery": 0, "other": 4}),  # the queues the app consumes from
        ("other", None, 4, {"celery": 5, "other": 0}),
        (["celery", "other"], "a", 7, {"celery": 2, "other": 0}),
        ("celery", "nobody", 0, {"celery": 5, "other": 4}),
    ],
)
def test_purge_drops_the_backlog_of_the_apps_queues(
    make_app: Callable[..., Any],
    limiter: Limiter,
    redis_url: str,
    namespace: str,
    queue: Any,
    tenant: str | None,
    dropped: int,
    left: dict[str, int],
) -> None:
    app = make_app()
    install(app, redis_url=redis_url, namespace=namespace)
    scheduler = parked(limiter, SPREAD)

    assert purge(app, queue, tenant=tenant) == dropped

    assert {q: scheduler.backlog(q) for q in left} == left


def test_control_purge_empties_the_broker_and_the_backlog(
    make_app: Callable[..., Any], limiter: Limiter, redis_url: str, namespace: str
) -> None:
    app = make_app()
    install(app, redis_url=redis_url, namespace=namespace)
    scheduler = parked(limiter, SPREAD)
    app.send_task("t", queue="celery")  # one waiting in the broker too

    assert app.control.purge() == 1 + 5
    assert (scheduler.backlog("celery"), scheduler.backlog("other")) == (0, 4)
    assert app.control.purge() == 0


def test_a_control_made_before_install_is_wrapped(
    make_app: Callable[..., Any], limiter: Limiter, redis_url: str, namespace: str
) -> None:
    app = make_app()
    early = app.control
    install(app, redis_url=redis_url, namespace=namespace)
    install(app)  # again: the same runtime, not wrapped twice
    scheduler = parked(limiter, SPREAD)

    assert app.control is early
    assert app.control.purge() == 5
    assert scheduler.backlog("celery") == 0


def test_an_apps_own_control_class_is_left_alone(
    make_app: Callable[..., Any],
    limiter: Limiter,
    redis_url: str,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Mine(Control):
        pass

    app = make_app(control=Mine)
    with caplog.at_level(logging.INFO, logger="queue_ratelimit.celery"):
        install(app, redis_url=redis_url, namespace=namespace)
    scheduler = parked(limiter, SPREAD)

    assert type(app.control) is Mine
    assert app.control.purge() == 0
    assert "control class of its own" in caplog.text
    assert purge(app) == 5
    assert scheduler.backlog("celery") == 0


def test_purge_needs_an_installed_app(make_app: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError, match="install"):
        purge(make_app())
