"""Real Celery and RQ worker processes for the worker benchmarks, and the job they run.

The job (Celery task ``bench.record``, RQ function ``benchmarks._workers.rq_record``) stamps
its start with Redis ``TIME``, sleeps, and pushes one line ``"<id> <tenant> <priority>
<start> <end>"`` (both stamps on Redis's clock) onto a list, so executions are counted
exactly and ordered on one clock whatever process ran them.

Worker processes import this module: ``celery -A benchmarks._workers worker`` builds the
module-level ``app`` from ``QRL_WB_*`` environment variables; RQ workers import
``rq_record`` by name. Each worker runs in a process group of its own and is stopped with
SIGKILL of that group once the benchmark has every record it waits for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from queue_ratelimit import Limiter

from ._common import broker_url_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# TIME and RPUSH in one atomic call: the end stamp is the moment the record lands.
_END_SCRIPT = """
local t = redis.call('TIME')
redis.call('RPUSH', KEYS[1], ARGV[1] .. ' ' .. t[1] .. '.' .. string.format('%06d', t[2]))
return 1
"""

_clients: dict[str, tuple[redis.Redis, Any]] = {}


def _recorder(url: str) -> tuple[redis.Redis, Any]:
    """A client per process and URL, made on first use (prefork children connect after fork)."""
    got = _clients.get(url)
    if got is None:
        client = redis.Redis.from_url(url)
        got = _clients[url] = (client, client.register_script(_END_SCRIPT))
    return got


def redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def started_key(key: str) -> str:
    """Where jobs asked to (``mark_start``) push their id as they start."""
    return f"{key}:started"


def record(
    url: str, key: str, job_id: str, tenant: str, priority: str, sleep: float, mark_start: bool
) -> None:
    """What every benchmark job does: stamp its start, sleep, record start and end.
    ``mark_start``: also push the id onto ``started_key(key)`` first (a job killed while it
    sleeps still shows that it started)."""
    client, end = _recorder(url)
    if mark_start:
        client.rpush(started_key(key), job_id)
    seconds, micros = client.time()
    if sleep:
        time.sleep(sleep)
    end(keys=[key], args=[f"{job_id} {tenant} {priority} {seconds}.{micros:06d}"])


def rq_record(key: str, tenant: str, priority: str, sleep: float, mark_start: bool = False) -> None:
    """The RQ job: records itself in the Redis named by ``$QRL_WB_RECORD``."""
    from rq import get_current_job

    job = get_current_job()
    assert job is not None
    record(os.environ["QRL_WB_RECORD"], key, job.id, tenant, priority, sleep, mark_start)


@dataclass(frozen=True, slots=True)
class Run:
    """One recorded execution (times on Redis's clock, seconds)."""

    job_id: str
    tenant: str
    priority: str
    start: float
    end: float


def read_runs(client: redis.Redis, key: str) -> list[Run]:
    """Every execution recorded under ``key``, ordered by start."""
    rows = []
    for raw in client.lrange(key, 0, -1):
        job_id, tenant, priority, start, end = raw.decode().split()
        rows.append(Run(job_id, tenant, priority, float(start), float(end)))
    rows.sort(key=lambda r: r.start)
    return rows


# -- processes --------------------------------------------------------------------------------
@dataclass
class WorkerProcess:
    """One worker process, in a process group of its own (its pool or job children too)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"


def _spawn(name: str, args: list[str], env: dict[str, str], logdir: Path) -> WorkerProcess:
    log = logdir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    )
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return WorkerProcess(name, proc, log)


def wait_for(
    condition: Callable[[], Any], *, timeout: float, what: str, workers: list[WorkerProcess]
) -> Any:
    """Poll ``condition`` until truthy; raise with the workers' log tails on timeout or when
    a worker exited."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        dead = [w for w in workers if not w.alive()]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {w.name} ({w.log})\n{w.tail()}" for w in workers)
            why = f"worker {dead[0].name} exited" if dead else f"timed out after {timeout} s"
            raise RuntimeError(f"{why} waiting for {what}\n{tails}")
        time.sleep(0.02)


# -- Celery -----------------------------------------------------------------------------------
def celery_ready_key(namespace: str) -> str:
    return f"wb:{namespace}:ready"


def build_celery_app(
    *,
    broker: str,
    redis_url: str,
    namespace: str,
    queue: str,
    record_key: str,
    mode: str,
    record_url: str | None = None,
    settings: dict[str, Any] | None = None,
    conf: dict[str, Any] | None = None,
) -> Any:
    """The benchmark's Celery app. ``mode``: ``fair`` (``install``, fair dispatch of worker
    capacity on), ``fifo`` (``install(fair_capacity=False)``), ``plain`` (no ``install``),
    ``producer`` (``install`` without hints: publishes rate headers, for the producer).

    Executions are recorded on ``record_url`` (default: the limiter's Redis); ``settings``
    go to ``install`` as well, ``conf`` to ``app.conf`` (``task_acks_late``...)."""
    records = record_url or redis_url
    from celery import Celery
    from celery.signals import worker_ready

    app = Celery(f"wb-{namespace}", broker=broker)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    app.conf.update(conf or {})
    if mode != "plain":
        from queue_ratelimit.celery import install

        install(
            app,
            redis_url=redis_url,
            namespace=namespace,
            hints=mode != "producer",
            fair_capacity=mode != "fifo",
            **(settings or {}),
        )

    @app.task(bind=True, shared=False, name="bench.record")
    def record_task(
        self: Any, tenant: str, priority: str, sleep: float, mark_start: bool = False
    ) -> None:
        record(records, record_key, self.request.id, tenant, priority, sleep, mark_start)

    @worker_ready.connect(weak=False)
    def announce(sender: Any = None, **_: Any) -> None:
        client = redis.Redis.from_url(records)
        try:
            client.hset(celery_ready_key(namespace), str(getattr(sender, "hostname", "?")), 1)
        finally:
            client.close()

    return app


def _celery_app_from_env() -> Any:
    env = os.environ
    if "QRL_WB_BROKER" not in env:
        return None
    return build_celery_app(
        broker=env["QRL_WB_BROKER"],
        redis_url=env["QRL_WB_REDIS"],
        namespace=env["QRL_WB_NAMESPACE"],
        queue=env["QRL_WB_QUEUE"],
        record_key=env["QRL_WB_KEY"],
        mode=env["QRL_WB_MODE"],
        record_url=env.get("QRL_WB_RECORD") or None,
        settings=json.loads(env.get("QRL_WB_SETTINGS") or "{}"),
        conf=json.loads(env.get("QRL_WB_CONF") or "{}"),
    )


# Celery worker processes load this module with ``celery -A benchmarks._workers``.
app = _celery_app_from_env()


def uninstall_producer(app: Any) -> None:
    """Disconnect a producer app's publish hook (receivers are process-wide), close it."""
    from celery.signals import before_task_publish

    before_task_publish.disconnect(dispatch_uid=f"queue_ratelimit:{id(app)}")
    app.close()


def start_celery_workers(
    *,
    count: int,
    concurrency: int,
    broker: str,
    redis_url: str,
    namespace: str,
    queue: str,
    record_key: str,
    mode: str,
    logdir: Path,
    timeout: float = 60.0,
    record_url: str | None = None,
    settings: dict[str, Any] | None = None,
    name: str = "w",
    conf: dict[str, Any] | None = None,
) -> list[WorkerProcess]:
    """``count`` prefork workers (``-c concurrency``) on ``queue``; returns once each one
    consumes (its ``worker_ready`` signal). ``record_url``, ``settings`` and ``conf``: as
    ``build_celery_app``; ``name`` starts each worker's name."""
    records = record_url or redis_url
    env = {
        "QRL_WB_BROKER": broker,
        "QRL_WB_REDIS": redis_url,
        "QRL_WB_NAMESPACE": namespace,
        "QRL_WB_QUEUE": queue,
        "QRL_WB_KEY": record_key,
        "QRL_WB_MODE": mode,
        "QRL_WB_RECORD": records,
        "QRL_WB_SETTINGS": json.dumps(settings or {}),
        "QRL_WB_CONF": json.dumps(conf or {}),
    }
    client = redis.Redis.from_url(records)
    ready_before = client.hlen(celery_ready_key(namespace))
    workers = []
    for i in range(count):
        worker_name = f"{name}{i}-{namespace}-{mode}"
        args = [
            sys.executable, "-m", "celery", "-A", "benchmarks._workers", "worker",
            "-P", "prefork", "-c", str(concurrency), "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-n", f"{worker_name}@%h", "-Q", queue,
            "--loglevel", "WARNING",
        ]  # fmt: skip
        workers.append(_spawn(worker_name, args, env, logdir))
    try:
        wait_for(
            lambda: client.hlen(celery_ready_key(namespace)) >= ready_before + count,
            timeout=timeout,
            what="celery workers ready",
            workers=workers,
        )
    except BaseException:
        for w in workers:
            w.kill()
        raise
    finally:
        client.close()
    return workers


class Databases:
    """The two databases a worker benchmark runs on: the limits' (``redis_url``) and the
    Celery broker's (the next database of the same server), emptied before each run."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.broker = broker_url_for(redis_url)
        self.client = redis.Redis.from_url(redis_url)
        self.broker_client = redis.Redis.from_url(self.broker)

    def close(self) -> None:
        self.client.close()
        self.broker_client.close()

    def fresh(self, prefix: str) -> tuple[str, Limiter]:
        """Both databases flushed, and a new namespace (``prefix`` and 8 hex digits) with
        its limiter (closed by the caller)."""
        self.client.flushdb()
        self.broker_client.flushdb()
        namespace = f"{prefix}{uuid.uuid4().hex[:8]}"
        return namespace, Limiter.from_url(self.redis_url, namespace=namespace)

    def celery_options(self, namespace: str, queue: str, record_key: str) -> dict[str, Any]:
        """What ``build_celery_app`` and ``start_celery_workers`` take about where to run."""
        return {
            "broker": self.broker, "redis_url": self.redis_url, "namespace": namespace,
            "queue": queue, "record_key": record_key,
        }  # fmt: skip


# -- RQ ---------------------------------------------------------------------------------------
def start_rq_workers(
    *,
    count: int,
    redis_url: str,
    namespace: str,
    queue: str,
    ours: bool,
    simple: bool,
    logdir: Path,
    timeout: float = 60.0,
    record_url: str | None = None,
    env: dict[str, str] | None = None,
    name: str = "w",
) -> list[WorkerProcess]:
    """``count`` RQ workers on ``queue``: ours (``queue-ratelimit rq worker``) or stock
    (``rq worker``), ``SimpleWorker`` or forking; returns once each has registered.
    Executions are recorded on ``record_url`` (default: ``redis_url``); ``env`` adds to the
    workers' environment; ``name`` starts each worker's name."""
    env = {
        "QRL_WB_RECORD": record_url or redis_url,
        "QUEUE_RATELIMIT_NAMESPACE": namespace,
        **(env or {}),
    }
    workers = []
    for i in range(count):
        worker_name = f"{name}{i}-{namespace}-{'ours' if ours else 'stock'}"
        common = [queue, "--url", redis_url, "--name", worker_name, "--logging_level", "WARNING"]
        if ours:
            args = [str(BIN / "queue-ratelimit"), "--namespace", namespace, "rq", "worker"]
            args += ["--simple", *common] if simple else common
        else:
            args = [str(BIN / "rq"), "worker", *common]
            if simple:
                args += ["-w", "rq.SimpleWorker"]
        workers.append(_spawn(worker_name, args, env, logdir))
    client = redis.Redis.from_url(redis_url)
    try:
        wait_for(
            lambda: all(client.exists(f"rq:worker:{w.name}") for w in workers),
            timeout=timeout,
            what="rq workers registered",
            workers=workers,
        )
    except BaseException:
        for w in workers:
            w.kill()
        raise
    finally:
        client.close()
    return workers
