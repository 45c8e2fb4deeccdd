"""The plugin's RQ classes behave as RQ's own where no rate option or limit is involved.

These are the differences RQ's own test suite found (``tests/rq_suite``): a job's stored
``meta`` holds only the rate options the caller gave, ``dequeue_any(timeout=0)`` refuses
as RQ's does, and a worker subclass's ``queue_class`` and ``job_class`` are kept.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
import redis
import rq
from rq.exceptions import DequeueTimeout
from rq.job import Job, JobStatus

from queue_ratelimit.rq import Queue, SimpleWorker, Worker
from queue_ratelimit.rq._queue import rate_options


@pytest.fixture
def conn(redis_client: redis.Redis, namespace: str) -> Iterator[redis.Redis]:
    yield redis_client
    keys = list(redis_client.scan_iter(match=f"*{namespace}*", count=1000))
    if keys:
        redis_client.delete(*keys)


def make_queue(conn: redis.Redis, namespace: str, suffix: str = "", **options: Any) -> Queue:
    return Queue(f"q-{namespace}{suffix}", connection=conn, rate_namespace=namespace, **options)


def stored_meta(conn: redis.Redis, job: Job) -> dict[str, Any]:
    return dict(Job.fetch(job.id, connection=conn).meta)


# -- 1. meta holds only the options given ------------------------------------------------
def test_meta_holds_only_the_rate_options_given(conn: redis.Redis, namespace: str) -> None:
    queue = make_queue(conn, namespace)

    none = queue.enqueue(len, "abc", meta={"custom": "value"})
    assert stored_meta(conn, none) == {"custom": "value"}
    assert none.rate_hint is not None  # type: ignore[attr-defined]
    assert stored_meta(conn, queue.enqueue(len, "abc")) == {}
    assert stored_meta(conn, queue.enqueue_call(len, args=("abc",))) == {}
    assert stored_meta(conn, queue.enqueue_in(timedelta(hours=1), len, "abc")) == {}

    only_priority = queue.enqueue(len, "abc", rate_priority="high")
    assert stored_meta(conn, only_priority) == {"rate_priority": "high"}
    only_tenant = queue.enqueue_call(len, args=("abc",), rate_tenant="acme")
    assert stored_meta(conn, only_tenant) == {"rate_tenant": "acme"}
    every = queue.enqueue(len, "abc", rate_tenant="acme", rate_priority="low", rate_cost=2)
    assert stored_meta(conn, every) == {
        "rate_tenant": "acme",
        "rate_priority": "low",
        "rate_cost": 2,
    }
    # The worker reads the defaults for what is not there.
    assert rate_options(stored_meta(conn, only_priority)) == ("default", "high", 1)
    assert rate_options({}) == ("default", "normal", 1)


def test_jobs_with_some_options_are_still_routed_by_them(conn: redis.Redis, namespace: str) -> None:
    queue = make_queue(conn, namespace)
    # A backlog in the lane: new jobs must join it rather than overtake it on RQ's list.
    queue.rate_scheduler.submit("other", f"blocker-{namespace}", queue=queue.name)

    queue.enqueue(len, "abc", rate_priority="high")
    queue.enqueue(len, "abc")
    assert conn.llen(queue.key) == 0, "routed into the fair backlog, not onto RQ's list"
    assert queue.rate_backlog == 3

    # A job saved elsewhere with only a priority in its meta, pushed by a queue of ours
    # (a requeue, a dependent, a retry) is recognised as carrying options and routed too.
    plain = rq.Queue(queue.name, connection=conn)
    saved = plain.create_job(len, args=("abc",), meta={"rate_priority": "high"})
    saved.save()
    make_queue(conn, namespace).push_job_id(saved.id)
    assert conn.llen(queue.key) == 0
    assert queue.rate_backlog == 4
    assert queue.rate_scheduler.backlog(queue.name, tenant="default") == 3


def raised(call: Callable[[], object]) -> type[BaseException] | None:
    try:
        call()
    except Exception as exc:
        return type(exc)
    return None


@pytest.mark.skipif(
    "unique" not in inspect.signature(rq.Queue.enqueue_job).parameters,
    reason="this RQ has no unique jobs",
)
def test_unique_without_a_job_id_is_refused_as_rq_does(conn: redis.Redis, namespace: str) -> None:
    # RQ tells an explicit id from a made-up one by whether the job has one yet: making
    # the job must not give it one (RQ 3's test_enqueue_at_unique_requires_job_id).
    ours = make_queue(conn, namespace)
    plain = rq.Queue(f"plain-{namespace}", connection=conn)
    later = timedelta(hours=1)
    expected = raised(partial(plain.enqueue_in, later, len, "abc", unique=True))
    assert raised(partial(plain.enqueue_job, plain.create_job(len), unique=True)) is ValueError
    for options in ({}, {"rate_tenant": "acme"}):
        call = partial(ours.enqueue_in, later, len, "abc", unique=True, **options)
        assert raised(call) is expected
        call = partial(ours.enqueue_job, ours.create_job(len, meta=options), unique=True)
        assert raised(call) is ValueError
    job = ours.enqueue(len, "abc", job_id=f"unique-{namespace}", unique=True, rate_tenant="a")
    assert job.id == f"unique-{namespace}"
    assert stored_meta(conn, job) == {"rate_tenant": "a"}
    assert not ours._pending  # nothing left over for a job that was pushed


def test_a_job_without_options_runs_with_the_defaults(conn: redis.Redis, namespace: str) -> None:
    queue = make_queue(conn, namespace)
    job = queue.enqueue(len, "abcd")
    SimpleWorker([queue], connection=conn).work(burst=True)
    job.refresh()
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == 4
    assert job.meta == {}


# -- 2. dequeue_any(timeout=0) ----------------------------------------------------------
@pytest.mark.parametrize("count", [0, 1, 2])
@pytest.mark.parametrize("filled", [False, True])
def test_dequeue_any_with_timeout_zero_refuses_as_rq_does(
    conn: redis.Redis, namespace: str, count: int, filled: bool
) -> None:
    queues = [make_queue(conn, namespace, f"-{i}") for i in range(count)]
    if filled:
        for q in queues:
            q.enqueue(len, "abc")
    plain = [rq.Queue(q.name, connection=conn) for q in queues]
    with pytest.raises(ValueError):  # noqa: PT011 (RQ's message is its own)
        rq.Queue.dequeue_any(plain, timeout=0, connection=conn)
    with pytest.raises(ValueError, match="timeout"):
        Queue.dequeue_any(queues, timeout=0, connection=conn)
    # Nothing was taken.
    assert [q.count for q in queues] == [1 if filled else 0] * count


def test_dequeue_any_other_timeouts_unchanged(conn: redis.Redis, namespace: str) -> None:
    queue = make_queue(conn, namespace)
    assert Queue.dequeue_any([queue], timeout=None, connection=conn) is None
    with pytest.raises(DequeueTimeout):
        Queue.dequeue_any([queue], timeout=1, connection=conn)
    job = queue.enqueue(len, "abc")
    found = Queue.dequeue_any([queue], timeout=1, connection=conn)
    assert found is not None
    assert found[0].id == job.id


def test_a_throttled_wait_is_a_pause_not_a_blocking_pop(
    conn: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#11 (a tenant budget shared by two queues): waiting for a tenant's tokens, the
    dequeue blocked on RQ's list with BLMOVE, whose timeout Redis ends on its own clock tick
    (a 25 ms timeout returned after about 100 ms), so every throttled wait ran late and an
    RQ queue lost each returning token to a Celery queue sharing the tenant. Only an idle
    queue (nothing in the backlog) blocks on its list now."""
    from queue_ratelimit import Limit, Limiter

    Limiter(conn, namespace=namespace).set_limit("tenant:acme", Limit(1, per=3600, burst=1))
    queue = make_queue(conn, namespace)
    first = queue.enqueue(len, "a", rate_tenant="acme")
    queue.enqueue(len, "b", rate_tenant="acme")
    found = Queue.dequeue_any([queue], timeout=1, connection=conn)
    assert found is not None
    assert found[0].id == first.id
    blocked: list[float] = []
    real = conn.blmove

    def blmove(first_list: str, second_list: str, timeout: float, *args: Any) -> Any:
        blocked.append(timeout)
        return real(first_list, second_list, timeout, *args)

    monkeypatch.setattr(conn, "blmove", blmove)

    with pytest.raises(DequeueTimeout):
        Queue.dequeue_any([queue], timeout=1, connection=conn)  # acme waits an hour

    assert blocked == []
    assert queue.rate_backlog == 1


# -- 3. queue_class and job_class of subclasses and arguments ----------------------------
class CustomJob(Job):
    pass


class CustomQueue(Queue):
    pass


class OtherQueue(rq.Queue):
    """Not ours at all: a worker told to use it uses it."""


@pytest.mark.parametrize("base", [Worker, SimpleWorker])
def test_worker_subclass_class_attributes_are_kept(conn: redis.Redis, base: type[Any]) -> None:
    class CustomWorker(base):  # type: ignore[misc,valid-type]
        job_class = CustomJob
        queue_class = CustomQueue

    worker = CustomWorker(CustomQueue("foo", connection=conn))
    assert worker.queue_class is CustomQueue
    assert worker.job_class is CustomJob
    by_name = CustomWorker("foo", connection=conn)
    assert type(by_name.queues[0]) is CustomQueue
    # `rq worker` passes RQ's plain class when none was asked for: the subclass's stands.
    for plain in (rq.Queue, "rq.Queue", "rq.queue.Queue"):
        assert CustomWorker("foo", connection=conn, queue_class=plain).queue_class is CustomQueue

    class OtherWorker(base):  # type: ignore[misc,valid-type]
        queue_class = OtherQueue

    other = OtherWorker("foo", connection=conn)
    assert other.queue_class is OtherQueue
    assert type(other.queues[0]) is OtherQueue


@pytest.mark.parametrize("base", [Worker, SimpleWorker])
def test_worker_class_arguments_are_kept(conn: redis.Redis, base: type[Any]) -> None:
    worker = base("foo", connection=conn, queue_class=OtherQueue, job_class=CustomJob)
    assert worker.queue_class is OtherQueue
    assert worker.job_class is CustomJob
    assert type(worker.queues[0]) is OtherQueue
    # RQ's plain class, as `rq worker` passes it, still becomes the fair one.
    assert base("foo", connection=conn, queue_class=rq.Queue).queue_class is Queue
    assert base("foo", connection=conn).queue_class is Queue


def test_classes_swapped_into_rq_are_not_taken_for_plain_ones(
    conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What tests/rq_suite does: rq.Queue rebound to ours. Our queue objects are kept as
    # they are, not rebuilt from their names (which would lose their settings).
    monkeypatch.setattr(rq, "Queue", Queue)
    queue = Queue("foo", connection=conn, rate_namespace="elsewhere")
    worker = Worker([queue], connection=conn)
    assert worker.queues[0] is queue
    assert worker.queue_class is Queue


@pytest.mark.parametrize(("raw", "expected"), [(None, 60.0), ("", 60.0), ("3", 3.0), ("0.5", 0.5)])
def test_the_rq_lease_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: float
) -> None:
    from queue_ratelimit.rq._options import ENV_LEASE, lease

    if raw is None:
        monkeypatch.delenv(ENV_LEASE, raising=False)
    else:
        monkeypatch.setenv(ENV_LEASE, raw)
    assert lease() == expected


def test_a_malformed_rq_lease_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from queue_ratelimit import ConfigError
    from queue_ratelimit.rq._options import ENV_LEASE, lease

    monkeypatch.setenv(ENV_LEASE, "soon")
    with pytest.raises(ConfigError, match=ENV_LEASE):
        lease()


# -- 5. what RQ cannot run ---------------------------------------------------------------
def test_an_item_that_is_not_an_rq_job_is_dropped_and_the_worker_goes_on(
    conn: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Celery gate parks items named ``<task id>.<retries>.<nonce>`` under its queue's
    name; an RQ queue of the same name in the same namespace is handed them. RQ refuses
    such an id (``ValueError``), which used to stop the worker (and each one after it)."""
    queue = make_queue(conn, namespace)
    scheduler = queue.rate_scheduler
    scheduler.submit("celery", "0b6c4e5a-celery-task.0.ab12cd34", queue=queue.name)
    job = queue.enqueue(len, "abc", rate_tenant="rq")  # contended: it joins the backlog
    assert queue.rate_backlog == 2
    SimpleWorker([queue], connection=conn).work(burst=True)
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert queue.rate_backlog == 0
    assert conn.llen(queue.intermediate_queue_key) == 0
    assert "not an RQ job id" in caplog.text
