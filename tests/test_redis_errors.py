"""One rule for Redis's failures on every surface: an outage (no answer, or "not now") is
``BackendUnavailable`` and the fail mode applies; any other error Redis answers with (broken
data: a key of the wrong type, a script that fails) is ``BackendError``, never taken for an
outage, so nothing fails open because of it, and no job is lost to it."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from conftest import RedisProcess, free_port
from redis._parsers.base import BaseParser

from queue_ratelimit import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    Decision,
    FairScheduler,
    Limit,
    Limiter,
)
from queue_ratelimit._core import is_outage, translated
from queue_ratelimit._scheduler import SubmitItem

HOUR = 3600.0


# -- the rule, on the replies redis-py parses -------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "outage"),
    [
        ("LOADING Redis is loading the dataset in memory", True),
        ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN", True),
        ("READONLY You can't write against a read only replica.", True),
        ("OOM command not allowed when used memory > 'maxmemory'.", True),
        ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", True),
        ("CLUSTERDOWN The cluster is down", True),
        ("TRYAGAIN Multiple keys request during rehashing of slot", True),
        ("NOREPLICAS Not enough good replicas to write.", True),
        ("MISCONF Redis is configured to save RDB snapshots, but it's unable to persist", True),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
        ("ERR increment or decrement would overflow", False),
        ("ERR value is not an integer or out of range", False),
        ("ERR Error running script (call to f_x): @user_script:1: attempt to compare", False),
        ("NOPERM this user has no permissions to run the 'fcall' command", False),
        ("ERR unknown command 'FCALL'", False),
    ],
)
def test_an_outage_is_told_from_an_error_redis_answers(reply: str, outage: bool) -> None:
    error = BaseParser.parse_error(reply)
    assert is_outage(error) is outage
    expected = BackendUnavailable if outage else BackendError
    assert isinstance(translated(error), expected)
    # The same error failing one command of a pipeline (redis-py rewrites its text).
    annotated = type(error)(f"Command # 1 (FCALL f 3 a b c) of pipeline caused error: {reply}")
    assert is_outage(annotated) is outage


def test_dropped_and_timed_out_connections_are_outages() -> None:
    for error in (redis.ConnectionError("refused"), redis.TimeoutError("read")):
        assert isinstance(translated(error), BackendUnavailable)
    assert isinstance(translated(ValueError("ours")), ValueError)  # not Redis's: as it is


def test_a_corrupt_config_is_a_backend_error_and_a_config_error() -> None:
    error = translated(redis.ResponseError("ERR queue-ratelimit: corrupt limit for global: x"))
    assert isinstance(error, BackendError)
    assert isinstance(error, ConfigError)
    assert str(error) == "queue-ratelimit: corrupt limit for global: x"


# -- real servers that answer "not now": the fail mode applies --------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(lambda: ["--replicaof", "127.0.0.1", str(free_port())], id="read-only"),
        pytest.param(lambda: ["--maxmemory", "1", "--maxmemory-policy", "noeviction"], id="oom"),
    ],
)
def test_a_server_that_cannot_serve_is_an_outage(
    redis_process: Callable[..., RedisProcess], extra: Callable[[], list[str]]
) -> None:
    server = redis_process(extra=extra())
    namespace = f"o{uuid.uuid4().hex[:8]}"
    lenient = Limiter.from_url(server.url, namespace=namespace, fail_mode="open")
    assert lenient.acquire("acme") == Decision(allowed=True, degraded=True)
    strict = Limiter.from_url(server.url, namespace=namespace)
    with pytest.raises(BackendUnavailable, match="not serving"):
        strict.acquire("acme")
    with pytest.raises(BackendUnavailable):
        FairScheduler(strict).submit("acme", "j1")


# -- broken data: BackendError everywhere, never a fail-open decision -------------------------
def break_keys(client: redis.Redis, namespace: str) -> list[bytes]:
    """Overwrite every key of the namespace with a string (WRONGTYPE for the scripts)."""
    keys = list(client.scan_iter(match=f"*{{{namespace}}}*", count=1000))
    for key in keys:
        client.delete(key)
        client.set(key, "not what the scripts expect")
    return keys


@pytest.fixture
def broken(limiter: Limiter, redis_client: redis.Redis) -> FairScheduler:
    """A namespace every key of which has the wrong type."""
    scheduler = FairScheduler(limiter)
    limiter.set_limit("tenant:*", Limit(100, burst=100))
    scheduler.set_tenant_weight("acme", 2)
    for n in range(3):
        scheduler.submit("acme", f"j{n}")
    scheduler.submit("acme", "other", queue="other")
    done = scheduler.dispatch(["default"], max_items=2).items
    scheduler.ack(done[0], remember=60)
    assert scheduler.gate("acme", "g1").action == "park"
    assert len(break_keys(redis_client, limiter.namespace)) >= 5
    return scheduler


def adopt_one(scheduler: FairScheduler) -> int:
    waiting = f"{scheduler.limiter.keys.base}:adopt-test"
    scheduler.client.rpush(waiting, "x")
    return scheduler.adopt("default", waiting, [("x", "acme", "normal", 1)])


# Every scheduler method that talks to Redis, on an item "j1" submitted before.
SCHEDULER_CALLS = [
    pytest.param(lambda s: s.submit("acme", "new"), id="submit"),
    pytest.param(lambda s: s.submit_many([SubmitItem("acme", "new")]), id="submit_many"),
    pytest.param(lambda s: s.dispatch(["default"]), id="dispatch"),
    pytest.param(lambda s: s.ack("j1"), id="ack"),
    pytest.param(lambda s: s.nack("j1"), id="nack"),
    pytest.param(lambda s: s.extend("j1"), id="extend"),
    pytest.param(lambda s: s.gate("acme", "new"), id="gate"),
    pytest.param(lambda s: s.hint("acme"), id="hint"),
    pytest.param(lambda s: s.route("acme", "new", "a-list"), id="route"),
    pytest.param(lambda s: s.weights(), id="weights"),
    pytest.param(lambda s: s.backlog("default"), id="backlog"),
    pytest.param(lambda s: s.in_flight(), id="in_flight"),
    pytest.param(lambda s: s.reap(), id="reap"),
    pytest.param(adopt_one, id="adopt"),
    pytest.param(lambda s: s.set_tenant_weight("acme", 3), id="set_tenant_weight"),
]


@pytest.mark.parametrize("fail_mode", ["raise", "open", "closed"])
def test_acquire_raises_a_backend_error_in_every_fail_mode(
    broken: FairScheduler, redis_client: redis.Redis, fail_mode: str
) -> None:
    limiter = Limiter(redis_client, namespace=broken.limiter.namespace, fail_mode=fail_mode)  # type: ignore[arg-type]
    with pytest.raises(BackendError, match="WRONGTYPE"):
        limiter.acquire("acme")
    assert limiter.backend_failures == 0  # not counted as an outage either


@pytest.mark.parametrize("call", SCHEDULER_CALLS)
def test_the_scheduler_raises_backend_errors(
    broken: FairScheduler, call: Callable[[FairScheduler], object]
) -> None:
    with pytest.raises(BackendError, match="WRONGTYPE"):
        call(broken)


def test_the_admin_api_answers_500_for_broken_data(broken: FairScheduler) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from queue_ratelimit.admin import create_app

    api = TestClient(create_app(broken.limiter, token="t", scheduler=broken))
    response = api.get("/limits", headers={"Authorization": "Bearer t"})
    assert response.status_code == 500
    assert response.json()["error"] == "BackendError"
    assert "WRONGTYPE" in response.json()["detail"]


# -- an unreachable server: BackendUnavailable from the scheduler too ----------------------------
@pytest.fixture
def gone(redis_process: Callable[..., RedisProcess]) -> Iterator[FairScheduler]:
    server = redis_process()
    limiter = Limiter.from_url(server.url, namespace="gone")
    scheduler = FairScheduler(limiter)
    scheduler.submit("acme", "j1")
    server.stop()
    yield scheduler
    limiter.close()


# (adopt_one pushes onto the list itself, which fails before the scheduler is called)
@pytest.mark.parametrize("call", [c for c in SCHEDULER_CALLS if c.id != "adopt"])
def test_the_scheduler_raises_backend_unavailable(
    gone: FairScheduler, call: Callable[[FairScheduler], object]
) -> None:
    with pytest.raises(BackendUnavailable, match="Redis unreachable") as info:
        call(gone)
    assert isinstance(info.value.__cause__, redis.ConnectionError)


def test_celery_install_survives_an_unreachable_redis(caplog: pytest.LogCaptureFixture) -> None:
    """Importing an app must not fail because the limiter's Redis is down at that moment."""
    pytest.importorskip("celery")
    from celery import Celery
    from celery.signals import before_task_publish

    from queue_ratelimit.celery import install

    app = Celery("down", broker="memory://", set_as_current=False)
    url = f"redis://127.0.0.1:{free_port()}/0"
    try:
        runtime = install(app, redis_url=url, limits={"limits": {"tenant:*": "5/s"}})
        assert runtime.settings.redis_url == url
        assert "could not seed limits" in caplog.text
    finally:
        before_task_publish.disconnect(dispatch_uid=f"queue_ratelimit:{id(app)}")
        app.close()


# -- RQ: a failing Redis holds the job (RQ backs off and calls again); none is lost -------------
class RQSetup:
    """Queues of a namespace of their own, dequeued in this process."""

    def __init__(self, redis_url: str, names: tuple[str, ...]) -> None:
        from queue_ratelimit.rq import Queue

        self.conn = redis.Redis.from_url(redis_url)
        self.namespace = f"rq{uuid.uuid4().hex[:10]}"
        self.limiter = Limiter(self.conn, namespace=self.namespace)
        self.queues = [
            Queue(f"{name}-{self.namespace}", connection=self.conn, rate_namespace=self.namespace)
            for name in names
        ]

    def enqueue(self, **meta: Any) -> str:
        import rq

        plain = rq.Queue(self.queues[-1].name, connection=self.conn)
        job = plain.enqueue("rq_e2e_jobs.record", "unused", meta=meta)
        return str(job.id)

    def dequeue(self) -> Any:
        from queue_ratelimit.rq import Queue

        return Queue.dequeue_any(self.queues, 1, connection=self.conn)

    def close(self) -> None:
        for match in (f"*{self.namespace}*",):
            keys = list(self.conn.scan_iter(match=match, count=1000))
            if keys:
                self.conn.delete(*keys)
        self.conn.close()


@pytest.fixture(params=[1, 2], ids=["one-queue", "two-queues"])
def rq_setup(request: pytest.FixtureRequest, redis_url: str) -> Iterator[RQSetup]:
    pytest.importorskip("rq")
    names = ("a", "b")[: request.param]
    setup = RQSetup(redis_url, names)
    try:
        yield setup
    finally:
        setup.close()


def break_every_key(setup: RQSetup) -> Callable[[], None]:
    broken = break_keys(setup.conn, setup.namespace)
    return lambda: setup.conn.delete(*broken)


def break_the_tenants_limit(setup: RQSetup) -> Callable[[], None]:
    config = setup.limiter.keys.config
    setup.conn.hset(config, "tenant:acme", "garbage")
    return lambda: setup.conn.hdel(config, "tenant:acme")


@pytest.mark.parametrize(
    "breakage",
    [
        # Fails the first call of the dequeue (before any job is taken).
        pytest.param(break_every_key, id="every-key"),
        # Fails only the gate, after the job was taken off RQ's list (with two queues it is
        # then in this process's hands alone).
        pytest.param(break_the_tenants_limit, id="the-tenants-limit"),
    ],
)
def test_rq_holds_the_job_while_redis_answers_errors(
    rq_setup: RQSetup,
    breakage: Callable[[RQSetup], Callable[[], None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    rq_setup.limiter.set_limit("tenant:*", Limit(100, burst=100))
    job_id = rq_setup.enqueue(rate_tenant="acme")
    fix = breakage(rq_setup)
    for _ in range(2):  # RQ's worker calls again after a pause: still broken, still held
        with pytest.raises(redis.ConnectionError, match=r"WRONGTYPE|corrupt limit"):
            rq_setup.dequeue()
    assert "Redis answered with an error" in caplog.text
    fix()
    rq_setup.limiter.set_limit("tenant:*", Limit(100, burst=100))
    found = rq_setup.dequeue()
    assert found is not None
    assert found[0].id == job_id


def test_rq_parks_a_job_whose_priority_has_no_weight(
    rq_setup: RQSetup, caplog: pytest.LogCaptureFixture
) -> None:
    from rq.exceptions import DequeueTimeout

    rq_setup.limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=1))
    assert rq_setup.limiter.acquire("acme", queue=rq_setup.queues[-1].name).allowed
    job_id = rq_setup.enqueue(rate_tenant="acme", rate_priority="urgent")
    with pytest.raises(DequeueTimeout):
        rq_setup.dequeue()  # parked: its tenant has no tokens left
    scheduler = rq_setup.queues[-1].rate_scheduler
    assert scheduler.backlog(rq_setup.queues[-1].name, "acme") == 1
    assert "priority 'urgent' has no weight" in caplog.text
    rq_setup.limiter.set_limit("tenant:acme", Limit(100, burst=100))
    found = rq_setup.dequeue()
    assert found is not None
    assert found[0].id == job_id


# -- the Celery gate's view of its Redis ------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate_health(fail_mode: str = "open") -> tuple[Any, Clock]:
    pytest.importorskip("celery")
    from queue_ratelimit.celery._health import RedisHealth

    clock = Clock()
    return RedisHealth(fail_mode, clock=clock), clock


def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "error",
    [
        BackendUnavailable("Redis unreachable: refused"),
        redis.TimeoutError("Timeout reading from socket"),
        BaseParser.parse_error("READONLY You can't write against a read only replica."),
    ],
)
def test_the_gate_fails_by_its_mode_on_an_outage_and_rests_between_probes(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    health, clock = gate_health("closed")
    health.failed(error, started=clock.now - 2.0)  # a call that waited out a 2 s timeout
    assert (health.broken, health.resting()) == (False, True)
    clock.now += 7.9
    assert health.resting()  # 4x the failed call
    clock.now += 0.2
    assert not health.resting()
    health.failed(error, started=clock.now)  # refused at once: the shortest rest
    clock.now += 0.26
    assert not health.resting()
    assert logged(caplog, "gate fails CLOSED") == 1  # once per outage
    health.ok()
    assert logged(caplog, "Redis reachable again") == 1
    assert health.down_since is None


def test_the_gate_holds_work_on_an_error_redis_answers_and_logs_it_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health, clock = gate_health("open")
    wrongtype = BackendError("Redis answered with an error: WRONGTYPE Operation")
    for _ in range(3):
        health.failed(wrongtype, started=clock.now)
        clock.now += 1
        assert health.broken  # the gate's fail-open path checks this: it holds the task
    assert logged(caplog, "Redis answered with an error") == 1
    health.failed(redis.ResponseError("ERR increment or decrement would overflow"), clock.now)
    assert logged(caplog, "Redis answered with an error") == 2  # another error: said
    clock.now += 60
    health.failed(wrongtype, started=clock.now)
    assert logged(caplog, "Redis answered with an error") == 3  # still broken: said again
    assert logged(caplog, "gate fails OPEN") == 0
    health.ok()
    assert logged(caplog, "Redis answering without errors again") == 1
    # The same error again soon after (one part of Redis stays broken while the gate
    # passes): neither it nor its end is logged once more.
    health.failed(wrongtype, started=clock.now)
    health.ok()
    assert logged(caplog, "Redis answered with an error") == 3
    assert logged(caplog, "without errors again") == 1


def test_a_failed_settlement_send_loses_none_sent_before_it(limiter: Limiter) -> None:
    """A Redis restart leaves the settler's connection dead: the first write after it can
    still go out (into the socket), the next one fails. The first one's reply is then lost
    with the connection: it must be reported as unknown (settled again the ordinary way),
    not forgotten, which left its in-flight record open until the lease handed the job out
    again (run twice)."""
    pytest.importorskip("celery")
    from queue_ratelimit.celery._settler import AsyncSettler
    from queue_ratelimit.celery._wire import Wire

    scheduler = FairScheduler(limiter)
    for n in range(2):
        scheduler.submit("acme", f"j{n}")
    first, second = scheduler.dispatch(["default"], max_items=2).items
    outcomes: list[tuple[str, str, bool | None]] = []
    wire = Wire(scheduler.client)  # no event loop: written at once, read on drain
    settler = AsyncSettler(
        scheduler, wire, lambda item_id, _item, how, closed: outcomes.append((item_id, how, closed))
    )
    assert settler.usable
    settler.send(first, "ack", 0, False)
    wire._conn._sock.shutdown(socket.SHUT_RDWR)  # the connection dies under it
    settler.send(second, "ack", 0, False)
    wire.drain()
    assert outcomes == [(first.id, "ack", None), (second.id, "ack", None)]
    assert settler.pending == 0
    settler.send(second, "ack", 0, False)  # on a new connection
    wire.drain()
    assert outcomes[-1] == (second.id, "ack", True)
    wire.close()
