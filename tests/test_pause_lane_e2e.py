"""End to end: a queue whose routing key is not its name (a topic exchange of its own),
in real Celery workers on both brokers. The gate decides under the queue the worker
consumed the message from; ``pause_and_retry(scope="queue")`` and ``strict_pauses`` must
name that queue too. Before, they took the routing key: the pause went to a queue that
holds nothing back (the handed-back copy ran at once, into the downstream that said 429),
and ``strict_pauses`` looked for a pause of the wrong queue (work admitted on credit ran
through the pause). Probed in docs/reliability.md, "Probed in session 8"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery_harness import E2E, report_logs_on_failure, wait_for
from test_celery_e2e import broker  # noqa: F401 (a fixture)

from queue_ratelimit import Limit

pytestmark = pytest.mark.slow

RETRY_AFTER = 1.5


def open_run(broker: str, redis_url: str, tmp_path: Path, **settings: object) -> E2E:  # noqa: F811
    run = E2E(broker=broker, redis_url=redis_url, workdir=tmp_path, settings=dict(settings))
    run.routing_key = f"rk.{run.namespace}"  # never the queue's name (q-<namespace>)
    return run


@pytest.fixture
def strict_run(
    broker: str,  # noqa: F811 (the fixture imported above)
    redis_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[E2E]:
    # The default gate credit: work of an uncontended tenant is admitted without Redis.
    report_logs_on_failure(request.config)
    run = open_run(broker, redis_url, tmp_path, strict_pauses=True)
    try:
        yield run
    finally:
        run.close()


@pytest.fixture
def exact_run(
    broker: str,  # noqa: F811
    redis_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[E2E]:
    # No credit, one job ahead of the pool: Redis decides every admission.
    report_logs_on_failure(request.config)
    run = open_run(broker, redis_url, tmp_path, credit=0, reserve=1)
    try:
        yield run
    finally:
        run.close()


def test_a_queue_pause_names_the_queue_the_gate_used(exact_run: E2E) -> None:
    e2e = exact_run
    e2e.records.set(f"e2e:{e2e.namespace}:partner:fails_at", 1)
    e2e.start_worker("w1", concurrency=1)
    wait_for(e2e.ready_hosts, timeout=30, what="worker ready", on_timeout=e2e.logs)
    task_id = e2e.app().tasks["e2e.partner"].apply_async(("x", RETRY_AFTER, "queue")).id

    [run] = e2e.wait_runs(1, timeout=30)
    [hit] = e2e.runs("429")
    assert run["id"] == hit["id"] == task_id
    assert hit["scope"] == f"queue:{e2e.queue}", "paused the routing key, not the queue"
    assert run["t"] >= hit["until_ms"] / 1000, "the handed-back task ran during the pause"
    assert "Traceback" not in e2e.logs()


def test_strict_pauses_look_at_the_queue_the_gate_used(strict_run: E2E) -> None:
    e2e = strict_run
    e2e.limiter.set_limit("tenant:*", Limit(1000))  # uncontended: credit is granted
    e2e.start_worker("w1", concurrency=1)
    wait_for(e2e.ready_hosts, timeout=30, what="worker ready", on_timeout=e2e.logs)
    work = e2e.app().tasks["e2e.work"]
    work.apply_async(("first",), rate_tenant="a")
    e2e.wait_runs(1, timeout=30)  # admitted by Redis: the worker now holds credit for a
    pause = e2e.limiter.pause(f"queue:{e2e.queue}", RETRY_AFTER)
    work.apply_async(("second",), rate_tenant="a")  # admitted on credit, from before the pause

    rows = e2e.wait_runs(2, timeout=30)
    [second] = [r for r in rows if r["tag"] == "second"]
    assert second["t"] >= pause.until_ms / 1000, "ran during the pause of its queue"
    assert "Traceback" not in e2e.logs()
