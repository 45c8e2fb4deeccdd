"""End to end: a task whose partner API answers 429 pauses its tenant and hands itself back,
in real Celery and RQ workers. Every job runs exactly once; none of the paused tenant
starts during the pause (on Redis's clock); the others go on; the handed-back job runs
first of its tenant's waiting work once the pause ends; nothing is counted as a failure."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery_harness import E2E, report_logs_on_failure, wait_for
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from test_celery_e2e import assert_exactly_once, broker  # noqa: F401 (a fixture)
from test_rq_e2e import RQEnv, env  # noqa: F401 (a fixture)

from queue_ratelimit import Limit

pytestmark = pytest.mark.slow

RETRY_AFTER = 1.5
FAILS_AT = 6


@pytest.fixture
def open_e2e(
    broker: str,  # noqa: F811 (the fixture imported above)
    redis_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., E2E]]:
    """Opens an E2E run with the gate settings given; closed (workers stopped) at the end."""
    report_logs_on_failure(request.config)
    opened: list[E2E] = []

    def open_with(**settings: Any) -> E2E:
        opened.append(E2E(broker=broker, redis_url=redis_url, workdir=tmp_path, settings=settings))
        return opened[-1]

    try:
        yield open_with
    finally:
        for run in opened:
            run.close()


@pytest.fixture
def e2e(open_e2e: Callable[..., E2E]) -> E2E:
    # A pause stops every admission after it; work admitted before it still runs. A
    # worker takes on up to `reserve` jobs ahead of its pool and holds `credit` admissions
    # (docs/tuning.md): with neither, whatever starts after the 429 was admitted after it,
    # so start times can be checked against the pause window.
    return open_e2e(credit=0, reserve=1)


def check_pause_window(
    starts: list[tuple[str, str, float]], paused: str, paused_id: str, set_at: float, until: float
) -> None:
    """Runs as (id, tenant, Redis time): none of ``paused`` in [set_at, until); the handed
    back job is the first of its tenant after the pause; someone else ran during it."""
    during = [r for r in starts if r[1] == paused and set_at <= r[2] < until]
    assert not during, f"ran during the pause [{set_at}, {until}): {during}"
    after = sorted((r for r in starts if r[1] == paused and r[2] >= until), key=lambda r: r[2])
    assert after, "nothing of the paused tenant ran after the pause"
    assert after[0][0] == paused_id, "the handed-back job keeps its place at the head"
    assert any(r[1] != paused and set_at <= r[2] < until for r in starts), (
        "the other tenant ran during the pause"
    )


@pytest.mark.parametrize("acks_late", [False, True], ids=["acks-early", "acks-late"])
def test_celery_task_pauses_its_tenant_on_a_429_and_runs_once_after(
    e2e: E2E, acks_late: bool
) -> None:
    e2e.acks_late = acks_late
    e2e.limiter.set_limit("tenant:*", Limit(20, burst=4))
    e2e.records.set(f"e2e:{e2e.namespace}:partner:fails_at", FAILS_AT)
    work = e2e.app().tasks["e2e.partner"]
    # One worker, one process.
    e2e.start_worker("w1", concurrency=1)
    wait_for(e2e.ready_hosts, timeout=30, what="worker ready", on_timeout=e2e.logs)
    published = {}
    for i in range(20):
        for tenant in ("a", "b"):
            published[work.apply_async((f"{tenant}{i}", RETRY_AFTER), rate_tenant=tenant).id] = (
                tenant
            )

    rows = e2e.wait_runs(len(published), timeout=60)
    assert_exactly_once(rows, set(published))
    [hit] = e2e.runs("429")
    assert published[hit["id"]] == hit["tenant"]
    until = hit["until_ms"] / 1000
    starts = [(r["id"], r["tenant"], r["t"]) for r in rows]
    check_pause_window(starts, hit["tenant"], hit["id"], hit["t"], until)
    # Not a failure, not a retry: the run after the pause is the task's own, retries 0.
    [again] = [r for r in rows if r["id"] == hit["id"]]
    assert again["retries"] == 0
    assert "Traceback" not in e2e.logs()
    audit = [(e.op, e.field) for e in e2e.limiter.audit_log()]
    assert ("pause", f"pause:tenant:{hit['tenant']}") in audit


@pytest.mark.parametrize("simple", [True, False], ids=["SimpleWorker", "Worker"])
def test_rq_job_pauses_its_tenant_on_a_429_and_runs_once_after(env: RQEnv, simple: bool) -> None:  # noqa: F811
    env.limiter.set_limit("tenant:*", Limit(20, burst=4))
    env.records.set(f"{env.key}:fails_at", FAILS_AT)
    queue = env.queue()
    jobs = [
        queue.enqueue("rq_e2e_jobs.partner", env.key, RETRY_AFTER, rate_tenant=t)
        for _ in range(20)
        for t in ("a", "b")
    ]
    env.wait_ready(env.start_worker("w1", simple=simple))

    runs = env.wait_runs(len(jobs), timeout=60)
    [hit] = [line.decode().split(" ") for line in env.records.lrange(f"{env.key}:429", 0, -1)]
    hit_id, tenant, set_at, until_ms = hit[0], hit[1], float(hit[2]), int(hit[3])
    ids = [j.id for j in jobs]
    counts = Counter(r.job_id for r in runs)
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1, "a job ran twice"
    starts = [(r.job_id, r.tenant, r.at) for r in runs]
    check_pause_window(starts, tenant, hit_id, set_at, until_ms / 1000)
    env.wait(
        lambda: all(s == JobStatus.FINISHED for s in env.statuses(ids).values()),
        timeout=10,
        what="every job finished",
    )
    job = Job.fetch(hit_id, connection=env.conn)
    assert job.number_of_retries in (None, 0)
    assert FailedJobRegistry(env.queue_name, connection=env.conn).count == 0
    worker = env.conn.hget(f"rq:worker:{env.namespace}-w1", "failed_job_count")
    assert worker in (None, b"0")


@pytest.fixture
def e2e_defaults(open_e2e: Callable[..., E2E]) -> E2E:
    # The default gate credit (16) and reserve (4 x the pool): a worker holds admissions
    # ahead of its pool when the pause comes; strict_pauses makes each look as it starts.
    return open_e2e(strict_pauses=True)


def test_celery_work_admitted_before_a_pause_does_not_start_during_it(
    e2e_defaults: E2E,
) -> None:
    """With default credit and reserve and ``strict_pauses``, jobs of the paused tenant are
    admitted and held by the worker when the 429 comes: none of them starts during the
    pause (Redis time), but
    for at most one already on its way to the pool; each runs exactly once, after it."""
    e2e = e2e_defaults
    e2e.limiter.set_limit("tenant:*", Limit(1000))  # uncontended: credit is granted
    e2e.records.set(f"e2e:{e2e.namespace}:partner:fails_at", FAILS_AT)
    work = e2e.app().tasks["e2e.partner"]
    # Two processes (a reserve of 8), and mostly the tenant that will be paused: the
    # worker holds several of its jobs, admitted, when one of them gets the 429.
    e2e.start_worker("w1", concurrency=2)
    wait_for(e2e.ready_hosts, timeout=30, what="worker ready", on_timeout=e2e.logs)
    published = {}
    for i in range(30):
        tenant = "b" if i % 6 == 5 else "a"
        published[work.apply_async((f"{tenant}{i}", RETRY_AFTER), rate_tenant=tenant).id] = tenant

    rows = e2e.wait_runs(len(published), timeout=60)
    assert_exactly_once(rows, set(published))
    [hit] = e2e.runs("429")  # (mostly a's, though b's may be the one: both are checked)
    set_at, until = hit["t"], hit["until_ms"] / 1000
    during = [r for r in rows if r["tenant"] == hit["tenant"] and set_at <= r["t"] < until]
    assert len(during) <= 1, f"ran during the pause [{set_at}, {until}): {during}"
    later = [r for r in rows if r["tenant"] == hit["tenant"] and r["t"] >= until]
    assert later, "the handed-back work ran after the pause"
    assert "Traceback" not in e2e.logs()


@pytest.mark.parametrize("strict", [False, True])
def test_tasks_look_for_pauses_as_they_start_only_with_strict_pauses(
    redis_url: str, strict: bool
) -> None:
    """The look costs a round trip per task: only ``strict_pauses`` installs it."""
    from celery import Celery
    from celery.signals import worker_init

    from queue_ratelimit.celery import install

    app = Celery(f"strict_pauses_check_{strict}", broker="memory://", set_as_current=False)

    name = f"strict_pauses_check.work_{strict}"  # (task names are process-wide)

    @app.task(name=name)
    def work() -> None: ...

    install(app, redis_url=redis_url, namespace="strictcheck", strict_pauses=strict)

    class Worker:  # what worker_init sends: the worker, which knows its app
        pass

    sender = Worker()
    sender.app = app  # type: ignore[attr-defined]
    worker_init.send(sender=sender)
    assert getattr(app.tasks[name], "_qrl_pause_guarded", False) is strict


@pytest.fixture
def e2e_credit(open_e2e: Callable[..., E2E]) -> E2E:
    # The default gate credit (16): the first admission of an uncontended tenant grants it.
    return open_e2e()


@pytest.mark.parametrize("producer", ["plugin", "foreign-malformed-tenant"])
def test_a_handed_back_task_waits_out_the_pause_with_the_default_credit(
    e2e_credit: E2E, producer: str
) -> None:
    """A task that pauses its tenant is handed back and runs once, after the pause: never
    on gate credit taken before it (it ran again at once, into the downstream that said
    429, up to ``credit`` times in a row), and also when its message came from a producer
    without the plugin with a tenant header the gate cannot use (the gate ran it as the
    default tenant; the pause went to the header's text and the copy was refused by the
    publish hook: the task failed)."""
    e2e = e2e_credit
    e2e.limiter.set_limit("tenant:*", Limit(1000))  # uncontended: credit is granted
    e2e.records.set(f"e2e:{e2e.namespace}:partner:fails_at", 1)
    e2e.start_worker("w1", concurrency=1)
    wait_for(e2e.ready_hosts, timeout=30, what="worker ready", on_timeout=e2e.logs)
    if producer == "plugin":
        task_id = e2e.app().tasks["e2e.partner"].apply_async(("a", RETRY_AFTER), rate_tenant="a").id
        tenant = "tenant:a"
    else:
        message = {"task_id": f"raw-{e2e.queue}", "args": ["x", RETRY_AFTER]}
        [task_id] = e2e.publish_raw(
            [{**message, "headers": {"qrl_tenant": "a:queue:b"}}], task="e2e.partner"
        )
        tenant = "tenant:default"  # what the gate ran it as

    [run] = e2e.wait_runs(1, timeout=30)
    [hit] = e2e.runs("429")
    assert run["id"] == hit["id"] == task_id
    assert run["t"] >= hit["until_ms"] / 1000, "the handed-back task ran during the pause"
    assert ("pause", f"pause:{tenant}") in [(e.op, e.field) for e in e2e.limiter.audit_log()]
    assert "Traceback" not in e2e.logs()
