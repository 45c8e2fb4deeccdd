"""The Celery pause helpers judged in the task, without a worker: which scope a task's
``pause_and_retry`` pauses and whether ``strict_pauses`` holds it back must be what the
gate decided the task under, and a task the gate never holds must not hand itself back.
(Found by probing pause_and_retry with hostile messages: docs/reliability.md, "Probed in
session 7".)"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Ignore

from queue_ratelimit import ConfigError, Limiter
from queue_ratelimit.celery import install, pause_and_retry, pause_scope
from queue_ratelimit.celery._pause_check import _paused

QUEUE = "jobs"


@pytest.fixture
def app(redis_url: str, namespace: str) -> Celery:
    app = Celery(f"pause_helpers_{namespace}", broker="memory://", set_as_current=False)
    app.conf.task_default_queue = QUEUE
    install(app, redis_url=redis_url, namespace=namespace)
    return app


def task_of(app: Celery, *, gated: bool = True) -> Any:
    name = f"pause_helpers.{uuid.uuid4().hex}"  # (task names are process-wide)

    @app.task(name=name, bind=True, rate_gate=gated)
    def work(self: Any) -> None: ...

    return app.tasks[name]


def running(task: Any, headers: dict[str, Any]) -> None:
    """Make ``task`` look as it does running in a worker, from a message with ``headers``
    (Celery sets each header as an attribute of the request too)."""
    task.push_request(
        called_directly=False,
        headers=headers,
        delivery_info={"routing_key": QUEUE},
        **headers,
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"qrl_tenant": "a:queue:b"},  # a scope's text: paused tenant a on queue b before
        {"qrl_tenant": "x" * 300},
        {"qrl_tenant": ["a"]},
        {"qrl_tenant": "a", "qrl_cost": "NaN"},  # a bad cost: the gate used every default
        {},  # no tenant (ConfigError before: the gate ran it as the default)
    ],
    ids=["scope-text", "too-long", "a-list", "bad-cost", "none"],
)
def test_a_task_pauses_the_tenant_the_gate_ran_it_as(
    app: Celery, limiter: Limiter, headers: dict[str, Any]
) -> None:
    """Headers the gate cannot use run the task as the default tenant (logged): its pause
    must be the default's, the only one that holds its handed-back copy."""
    task = task_of(app)
    running(task, headers)
    assert pause_scope(task, 5).scope == "tenant:default"
    assert pause_scope(task, 5, scope="tenant_queue").scope == f"tenant:default:queue:{QUEUE}"
    assert set(limiter.pauses()) == {"tenant:default", f"tenant:default:queue:{QUEUE}"}


def test_strict_pauses_look_at_the_tenant_the_gate_ran_the_task_as(
    app: Celery, limiter: Limiter
) -> None:
    """A message whose tenant header is a scope's text (``a:queue:b``) ran as the default
    tenant; a pause of tenant a on queue b must not hand it back (the gate would admit the
    copy at once: a loop until the pause ends), a pause of the default must."""
    task = task_of(app)
    running(task, {"qrl_tenant": "a:queue:b"})
    limiter.pause("tenant:a:queue:b", 30)
    assert not _paused(task)
    limiter.pause("tenant:default", 30)
    assert _paused(task)


@pytest.mark.parametrize("scope", ["queue", "global", "tenant"])
def test_a_task_outside_the_gate_is_refused_before_anything_is_paused(
    app: Celery, limiter: Limiter, scope: str
) -> None:
    """``rate_gate=False``: nothing would hold the copy back. It ran again at once, into
    the downstream that said 429, and handed itself back again: 200 runs in under 4 s in a
    real worker, where a 5 s pause was asked for each time."""
    task = task_of(app, gated=False)
    running(task, {"qrl_tenant": "a"})
    with pytest.raises(ConfigError, match="not gated"):
        pause_and_retry(task, 5, scope=scope)
    assert limiter.pauses() == {}


def test_a_gated_task_is_handed_back_with_the_options_the_gate_used(
    app: Celery, limiter: Limiter
) -> None:
    """The copy carries the default tenant the gate used, not the header the publish hook
    refuses (which raised InvalidName out of the task after the pause was set)."""
    task = task_of(app)
    running(task, {"qrl_tenant": "a:queue:b", "qrl_nonce": "n1"})
    sent: list[dict[str, Any]] = []
    task.app.amqp.send_task_message = lambda *a, **kw: sent.append(kw["headers"])  # type: ignore[method-assign]
    with pytest.raises(Ignore):
        pause_and_retry(task, 5)
    [headers] = sent
    assert headers["qrl_tenant"] == "default"
    assert headers["qrl_front"] == "1"
    assert headers["qrl_nonce"] != "n1"
    assert set(limiter.pauses()) == {"tenant:default"}
