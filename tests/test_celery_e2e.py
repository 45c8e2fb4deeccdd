"""End to end with real Celery workers (prefork, two of them) on the Redis broker and RabbitMQ."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery_harness import (
    AMQP_URL,
    E2E,
    amqp_unreachable_reason,
    max_in_window,
    redis_broker_url,
    report_logs_on_failure,
)

from queue_ratelimit import Limit

pytestmark = pytest.mark.slow

# Executions are stamped when the task body starts, a few ms after the gate admitted them
# (hand-off to a pool process); admissions in a window of T can therefore show up spread
# over T plus this much, and the cap is checked against that widened window.
HANDOFF = 0.1


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> str:
    if request.param == "redis":
        return redis_broker_url(redis_url)
    reason = amqp_unreachable_reason()
    if reason:
        pytest.skip(reason)
    return AMQP_URL


@pytest.fixture
def e2e(
    broker: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[E2E]:
    report_logs_on_failure(request.config)
    env = E2E(broker=broker, redis_url=redis_url, workdir=tmp_path)
    try:
        yield env
    finally:
        env.close()


def assert_cap(times: list[float], rate: float, burst: float, what: str) -> None:
    """At most ``rate * T + burst`` executions in any window of T (several T checked)."""
    span = max(times) - min(times)
    for window in (0.25, 0.5, 1.0, 2.0, span):
        most = max_in_window(times, window)
        bound = rate * (window + HANDOFF) + burst
        assert most <= bound, f"{what}: {most} runs within {window:.2f}s > {bound:.1f}"


def exactly_once(rows: list[dict[str, object]], published: set[str]) -> None:
    counts = Counter(str(r["id"]) for r in rows)
    missing = published - set(counts)
    twice = {i: n for i, n in counts.items() if n > 1}
    extra = set(counts) - published
    assert not missing and not twice and not extra, (
        f"missing {len(missing)}, run twice {twice}, unknown {extra}"
    )


def test_tenant_and_global_caps_hold_across_workers(e2e: E2E) -> None:
    e2e.limiter.set_limit("tenant:*", Limit(10, burst=5))
    e2e.limiter.set_limit("global", Limit(25, burst=5))
    e2e.start_workers("w1", "w2")
    work = e2e.app().tasks["e2e.work"]
    tenants = {}
    for _ in range(40):
        for tenant in ("a", "b", "c"):
            tenants[work.apply_async(("cap",), rate_tenant=tenant).id] = tenant

    rows = e2e.wait_runs(len(tenants), timeout=30)
    exactly_once(rows, set(tenants))
    assert all(r["tenant"] == tenants[r["id"]] for r in rows)
    assert len({r["host"] for r in rows}) == 2, "both workers ran tasks"
    assert_cap([r["t"] for r in rows], 25, 5, "global")
    for tenant in ("a", "b", "c"):
        assert_cap([r["t"] for r in rows if r["tenant"] == tenant], 10, 5, f"tenant {tenant}")
    # The global cap binds (3 x 10/s > 25/s) and is used: 120 jobs take about 115/25 s.
    span = max(r["t"] for r in rows) - min(r["t"] for r in rows)
    assert 115 / 25 * 0.9 <= span <= 115 / 25 * 1.5
