"""A worker's INFO summary of throttled work (``ThrottleLog``), with a hand-driven clock."""

from __future__ import annotations

import logging

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from queue_ratelimit import FairScheduler, Limit, Limiter
from queue_ratelimit._throttle_log import ThrottleLog

log = logging.getLogger("test.throttle")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    found = [r.getMessage() for r in caplog.records if r.name == log.name]
    caplog.clear()
    return found


def test_one_line_per_tenant_per_interval(
    limiter: Limiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = FairScheduler(limiter)
    for i in range(3):
        scheduler.submit("acme", f"a{i}", queue="emails")
    scheduler.submit("zed", "z0", queue="emails")
    throttled = ThrottleLog(log, 10, clock=clock)
    caplog.set_level(logging.INFO, logger=log.name)

    for _ in range(5):
        throttled.parked("emails", "acme", "tenant:acme")
    throttled.parked("emails", "zed", None)
    clock.now += 9
    throttled.report(scheduler, ["emails"])
    assert lines(caplog) == [], "not before the interval is up"

    clock.now += 1
    throttled.report(scheduler, ["emails"])
    assert lines(caplog) == [
        "queue-ratelimit: throttled: tenant acme on emails: 5 parked in the last 10 s "
        "(tenant:acme), 3 waiting",
        "queue-ratelimit: throttled: tenant zed on emails: 1 parked in the last 10 s "
        "(queued behind others), 1 waiting",
    ]
    clock.now += 60
    throttled.report(scheduler, ["emails"])
    assert lines(caplog) == [], "nothing held back since: nothing to say"


def test_waiting_work_is_reported_while_the_worker_waits(
    limiter: Limiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that parks nothing new but waits for the budgets still says why."""
    scheduler = FairScheduler(limiter)
    scheduler.submit("acme", "a0", queue="emails")
    throttled = ThrottleLog(log, 5, clock=clock)
    caplog.set_level(logging.INFO, logger=log.name)
    clock.now += 100  # a quiet hour before: the summary's time starts with what it counts
    throttled.waited()
    clock.now += 5
    throttled.report(scheduler, ["emails"])
    assert lines(caplog) == [
        "queue-ratelimit: throttled: tenant acme on emails: 0 parked in the last 5 s, 1 waiting"
    ]


def test_past_max_tenants_the_rest_are_summed(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    throttled = ThrottleLog(log, 1, max_tenants=2, clock=clock)
    caplog.set_level(logging.INFO, logger=log.name)
    for n, tenant in enumerate(["a", "b", "c", "d"]):
        for _ in range(4 - n):
            throttled.parked("q", tenant, "global")
    clock.now += 1
    throttled.emit({("q", "d"): 10})
    said = lines(caplog)
    assert [s.split(":")[2].strip() for s in said[:2]] == ["tenant d on q", "tenant a on q"]
    assert said[2] == "queue-ratelimit: throttled: 2 more tenant(s): 5 parked, 0 waiting"


def test_an_unreachable_redis_still_gets_the_counts_said(
    limiter: Limiter,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scheduler = FairScheduler(limiter)

    def down(*_: object, **__: object) -> None:
        raise RedisConnectionError("down")

    monkeypatch.setattr(scheduler.client, "pipeline", down)
    throttled = ThrottleLog(log, 1, clock=clock)
    caplog.set_level(logging.INFO, logger=log.name)
    throttled.parked("q", "acme", "tenant:acme")
    clock.now += 1
    throttled.report(scheduler, ["q"])
    assert lines(caplog) == [
        "queue-ratelimit: throttled: tenant acme on q: 1 parked in the last 1 s (tenant:acme), "
        "0 waiting"
    ]


def test_interval_zero_says_nothing(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    throttled = ThrottleLog(log, 0, clock=clock)
    throttled.parked("q", "acme", "tenant:acme")
    clock.now += 3600
    assert not throttled.due()


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "10"])
def test_a_bad_log_interval_is_refused(value: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from queue_ratelimit import ConfigError
    from queue_ratelimit.celery import CelerySettings
    from queue_ratelimit.rq._options import ENV_LOG_INTERVAL, log_interval

    with pytest.raises(ConfigError, match="log_interval"):
        CelerySettings(log_interval=value)  # type: ignore[arg-type]
    if isinstance(value, float | int):
        monkeypatch.setenv(ENV_LOG_INTERVAL, str(value))
        with pytest.raises(ConfigError, match=ENV_LOG_INTERVAL):
            log_interval()
    monkeypatch.setenv(ENV_LOG_INTERVAL, "0")
    assert log_interval() == 0


def test_the_line_and_the_bindings_name_the_window_that_bound(
    limiter: Limiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A scope of several windows: the gate's verdict, the hint, the throttle line and the
    gate report's bindings name the window that held the work back, as
    ``Decision.remaining`` names it: ``tenant:acme (2/d)``."""
    limiter.set_limit("tenant:acme", ["100/s", "2/d"])
    limiter.set_limit("tenant:bob", "1/h")
    scheduler = FairScheduler(limiter)
    assert scheduler.gate("acme", "a0", queue="q", cost=2).action == "run"
    verdict = scheduler.gate("acme", "a1", queue="q")
    assert (verdict.action, verdict.denied_by, verdict.window) == ("park", "tenant:acme", "2/d")
    assert verdict.binding == "tenant:acme (2/d)"
    hint = scheduler.hint("acme", queue="q")
    assert (hint.denied_by, hint.window, hint.binding) == (
        "tenant:acme",
        "2/d",
        "tenant:acme (2/d)",
    )
    assert hint.as_header()["window"] == "2/d"
    assert scheduler.gate("bob", "b0", queue="q").action == "run"
    single = scheduler.gate("bob", "b1", queue="q")
    assert (single.denied_by, single.window, single.binding) == ("tenant:bob", None, "tenant:bob")
    assert "window" not in scheduler.hint("bob", queue="q").as_header()

    throttled = ThrottleLog(log, 10, clock=clock)
    caplog.set_level(logging.INFO, logger=log.name)
    throttled.parked("q", "acme", verdict.binding)
    throttled.parked("q", "bob", single.binding)
    clock.now += 10
    throttled.emit({})
    assert lines(caplog) == [
        "queue-ratelimit: throttled: tenant acme on q: 1 parked in the last 10 s "
        "(tenant:acme (2/d)), 0 waiting",
        "queue-ratelimit: throttled: tenant bob on q: 1 parked in the last 10 s "
        "(tenant:bob), 0 waiting",
    ]
    # Kept past the summary, for `celery inspect qrl_gate`.
    assert throttled.bindings() == {"q": {"acme": "tenant:acme (2/d)", "bob": "tenant:bob"}}


def test_jobs_parked_behind_a_windowed_first_keep_its_window(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The gate parks a tenant's later jobs behind its first by its tenant scope alone:
    the line keeps the window the first one named."""
    throttled = ThrottleLog(log, 10, clock=clock)
    caplog.set_level(logging.INFO, logger=log.name)
    throttled.parked("q", "acme", "tenant:acme (2/d)")
    throttled.parked("q", "acme", "tenant:acme")
    throttled.parked("q", "acme", None)
    clock.now += 10
    throttled.emit({})
    assert lines(caplog) == [
        "queue-ratelimit: throttled: tenant acme on q: 3 parked in the last 10 s "
        "(tenant:acme (2/d)), 0 waiting"
    ]
    assert throttled.bindings() == {"q": {"acme": "tenant:acme (2/d)"}}


def test_work_held_back_at_dispatch_is_said_with_its_window(
    limiter: Limiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Work parked before any budget was asked (for want of a worker slot) meets its
    budget at dispatch: the dispatch's reply names the scope and window, and the summary
    and ``bindings`` say so as for the gate's own parks (which then keep the window)."""
    limiter.set_limit("tenant:acme", [Limit(100), Limit(1, per=86400, burst=1)])
    scheduler = FairScheduler(limiter)
    for i in range(3):
        scheduler.submit("acme", f"a{i}", queue="q")  # parked as a saturated worker does
    batch = scheduler.dispatch(["q"], max_items=3)
    assert [i.id for i in batch.items] == ["a0"]
    (held,) = batch.held_back
    assert (held.queue, held.tenant, held.binding) == ("q", "acme", "tenant:acme (1/d)")

    throttled = ThrottleLog(log, 10, clock=clock)
    caplog.set_level(logging.INFO, logger=log.name)
    throttled.held_back(held.queue, held.tenant, held.binding)
    assert throttled.bindings() == {"q": {"acme": "tenant:acme (1/d)"}}
    clock.now += 10
    throttled.report(scheduler, ["q"])
    assert lines(caplog) == [
        "queue-ratelimit: throttled: tenant acme on q: 0 parked in the last 10 s "
        "(tenant:acme (1/d)), 2 waiting"
    ]
    # The gate parks the tenant's next job behind its parked ones by the scope alone.
    verdict = scheduler.gate("acme", "a3", queue="q")
    assert (verdict.action, verdict.binding) == ("park", "tenant:acme")
    throttled.parked("q", "acme", verdict.binding)
    assert throttled.bindings() == {"q": {"acme": "tenant:acme (1/d)"}}
