"""Real Celery workers for the end-to-end tests: start, wait for, kill, and read their logs.

``report_logs_on_failure`` registers a small plugin that attaches the tail of every worker
log to the report of a failed test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import e2e_support
import pytest
import redis
from celery.signals import before_task_publish
from celery_e2e_app import build_app, ready_key, runs_key
from e2e_support import GroupProcess
from kombu import Connection

from queue_ratelimit import FairScheduler, Limiter

TESTS_DIR = Path(__file__).resolve().parent
AMQP_URL = os.environ.get("QRL_E2E_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def with_db(url: str, db: int) -> str:
    """``url`` pointing at Redis database ``db``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def redis_broker_url(redis_url: str) -> str:
    """A database of the test Redis next to the limiter's, for the Redis broker."""
    path = urlsplit(redis_url).path.strip("/")
    db = int(path) if path.isdigit() else 0
    return with_db(redis_url, (db + 1) % 16)


def amqp_unreachable_reason(url: str = AMQP_URL) -> str | None:
    """Why RabbitMQ at ``url`` cannot be used, or None when it answers."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 1):
            pass
    except OSError as exc:
        return f"RabbitMQ is not reachable at {parts.hostname}:{parts.port or 5672}: {exc}"
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # any failure to log in means: no usable broker
        return f"RabbitMQ at {parts.hostname} refused the connection: {exc!r}"
    return None


def redis_now(client: redis.Redis) -> float:
    """Redis's clock, in seconds (the clock executions are recorded on)."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def wait_for(
    condition: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    on_timeout: Callable[[], str] | None = None,
    interval: float = 0.05,
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s.

    Exceptions raised by ``condition`` count as "not yet" (services may be coming up).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = condition()
        except Exception as exc:  # the thing polled may be restarting
            result, last = None, exc
        if result:
            return result
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            pytest.fail(
                f"timed out after {timeout}s waiting for {what} (last error: {last!r})\n{extra}"
            )
        time.sleep(interval)


class Worker(GroupProcess):
    """One ``celery worker`` process (and its pool children, in its own process group)."""

    def pool_pids(self) -> list[int]:
        """Pids of the worker's pool processes (its children)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown (SIGTERM); SIGKILL if it takes longer than ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        self.kill()
        # Pool children that outlived their parent belong to the same group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


@dataclass
class E2E:
    """Everything one end-to-end test needs: where things are, workers, and its records.

    Attributes:
        broker: the broker URL workers and the producer use.
        redis_url: the limiter's Redis.
        record_url: where executions are recorded (the limiter's Redis unless it restarts).
        namespace: the limiter namespace (unique per test); also names the test's queue.
        backend: a result backend URL for workers and producers; none (no results) when
            empty.
        routing_key: publish tasks as ``<routing_key>.jobs`` to a topic exchange of the
            queue's own (a routing key that is not the queue's name); Celery's default
            routing when empty.
    """

    broker: str
    redis_url: str
    workdir: Path
    record_url: str = ""
    namespace: str = field(default_factory=lambda: f"e2e{uuid.uuid4().hex[:10]}")
    acks_late: bool = False
    backend: str = ""
    routing_key: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    _apps: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.record_url = self.record_url or self.redis_url
        self.records = redis.Redis.from_url(self.record_url)
        self.limiter = Limiter.from_url(self.redis_url, namespace=self.namespace)

    @property
    def queue(self) -> str:
        return f"q-{self.namespace}"

    # -- workers -------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            QRL_E2E_BROKER=self.broker,
            QRL_E2E_REDIS=self.redis_url,
            QRL_E2E_RECORD=self.record_url,
            QRL_E2E_NAMESPACE=self.namespace,
            QRL_E2E_QUEUE=self.queue,
            QRL_E2E_ACKS_LATE="1" if self.acks_late else "0",
            QRL_E2E_SETTINGS=json.dumps(self.settings),
            QRL_E2E_BACKEND=self.backend,
            QRL_E2E_ROUTING_KEY=self.routing_key,
            PYTHONPATH=os.pathsep.join(
                [str(TESTS_DIR), str(TESTS_DIR.parent), env.get("PYTHONPATH", "")]
            ),
        )
        return env

    def start_worker(self, name: str, *, concurrency: int = 2) -> Worker:
        """Start ``celery worker`` (prefork) in its own process group; returns at once."""
        log = self.workdir / f"{name}.log"
        args = [
            sys.executable, "-m", "celery", "-A", "celery_e2e_app", "worker",
            "-P", "prefork", "-c", str(concurrency),
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"{name}.{self.namespace}@%h", "-Q", self.queue,
            "--loglevel", "INFO",
        ]  # fmt: skip
        with log.open("ab") as out:
            proc = subprocess.Popen(
                args,
                cwd=TESTS_DIR,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: kill() reaches the pool too
            )
        worker = Worker(name, proc, log)
        self.workers.append(worker)
        return worker

    def ready_hosts(self) -> set[str]:
        return {h.decode() for h in self.records.hkeys(ready_key(self.namespace))}

    def start_workers(
        self, *names: str, timeout: float = 30.0, concurrency: int = 2
    ) -> list[Worker]:
        """Start workers and wait until each one consumes (its ``worker_ready`` signal)."""
        started = [self.start_worker(n, concurrency=concurrency) for n in names]

        def all_ready() -> bool:
            for w in started:
                if not w.alive():
                    pytest.fail(f"worker {w.name} exited with {w.proc.returncode}\n{w.tail()}")
            hosts = self.ready_hosts()
            return all(any(h.startswith(f"{w.name}.") for h in hosts) for w in started)

        wait_for(all_ready, timeout=timeout, what=f"workers {names} ready",
                 on_timeout=self.logs)  # fmt: skip
        return started

    def full_logs(self) -> str:
        """Every worker's whole log."""
        return "\n".join(w.log.read_text(errors="replace") for w in self.workers if w.log.exists())

    def logs(self) -> str:
        return "\n".join(f"----- {w.name} ({w.log}) -----\n{w.tail()}" for w in self.workers)

    # -- producing -----------------------------------------------------------------------
    def app(self, **settings: Any) -> Any:
        """A producer app like the workers' (``settings`` override the test's)."""
        app = build_app(
            broker=self.broker,
            redis_url=self.redis_url,
            namespace=self.namespace,
            queue=self.queue,
            record_url=self.record_url,
            acks_late=self.acks_late,
            settings={**self.settings, **settings},
            backend=self.backend or None,
            routing_key=self.routing_key,
        )
        self._apps.append(app)
        return app

    def publish_raw(self, messages: list[dict[str, Any]], task: str = "e2e.work") -> list[str]:
        """Publish ``task`` messages as a producer without the plugin does: from a
        process of its own (this one has the plugin's publish hook, which would rewrite the
        headers and add a nonce). Each message is ``{"task_id", "args", "headers"}``; a header
        value ``"HUGE"`` is sent as ``2**1100``. Returns the ids published: one the broker
        cannot carry (AMQP and a 2**1100) is refused by the producer and left out."""
        script = (
            "import sys, json\n"
            "from celery import Celery\n"
            "app = Celery('raw', broker=sys.argv[1])\n"
            "for m in json.loads(sys.argv[3]):\n"
            "    h = {k: (2**1100 if v == 'HUGE' else v) for k, v in m['headers'].items()}\n"
            "    try:\n"
            "        app.send_task(sys.argv[4], args=m['args'], queue=sys.argv[2], headers=h,\n"
            "                      task_id=m['task_id'])\n"
            "    except Exception:\n"
            "        continue\n"
            "    print(json.dumps(m['task_id']))\n"
        )
        published = subprocess.run(
            [sys.executable, "-c", script, self.broker, self.queue, json.dumps(messages), task],
            check=True,
            timeout=60,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        return [json.loads(line) for line in published]

    # -- records -------------------------------------------------------------------------
    def runs(self, event: str = "run") -> list[dict[str, Any]]:
        """Every execution recorded so far, in order."""
        raw = self.records.lrange(runs_key(self.namespace), 0, -1)
        rows = [json.loads(r) for r in raw]
        return [r for r in rows if r["event"] == event]

    def running(self) -> list[dict[str, Any]]:
        """Executions started and not finished (tasks called with a ``sleep``)."""
        rows = self.records.lrange(runs_key(self.namespace), 0, -1)
        events = [json.loads(r) for r in rows]
        done = {e["id"] for e in events if e["event"] == "done"}
        return [e for e in events if e["event"] == "run" and e["id"] not in done]

    def wait_runs(self, count: int, *, timeout: float, event: str = "run") -> list[dict[str, Any]]:
        """Wait until at least ``count`` executions are recorded; returns them all."""
        return wait_for(
            lambda: (rows := self.runs(event)) and len(rows) >= count and rows,
            timeout=timeout,
            what=f"{count} recorded executions (have {len(self.runs(event))})",
            on_timeout=self.logs,
        )

    def wait_ids(self, ids: set[str], *, timeout: float, what: str) -> list[dict[str, Any]]:
        """Wait until every id in ``ids`` ran at least once; returns every execution."""

        def all_ran() -> list[dict[str, Any]] | None:
            rows = self.runs()
            return rows if ids <= {r["id"] for r in rows} else None

        return wait_for(all_ran, timeout=timeout, what=what, on_timeout=self.logs)

    def wait_settled(self, *, timeout: float) -> list[dict[str, Any]]:
        """Wait until nothing is parked or in flight in the limiter, then a moment more
        (a pool process records a task just after the main process acknowledged it);
        returns every execution."""
        scheduler = FairScheduler(self.limiter)
        wait_for(
            lambda: scheduler.in_flight() == 0 and scheduler.backlog(self.queue) == 0,
            timeout=timeout,
            what="no work parked or in flight",
            on_timeout=self.logs,
        )
        time.sleep(0.3)
        return self.runs()

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        for w in self.workers:
            w.kill()
        for app in self._apps:
            # Receivers are global; a later test must not run this app's hook.
            before_task_publish.disconnect(dispatch_uid=f"queue_ratelimit:{id(app)}")
            app.close()
        self._cleanup_broker()
        for client in (self.records, self.limiter.client):
            try:
                keys = list(client.scan_iter(match=f"*{self.namespace}*", count=1000))
                if keys:
                    client.delete(*keys)
            except redis.RedisError:
                pass
            client.close()

    def _cleanup_broker(self) -> None:
        if self.broker.startswith("amqp"):
            try:
                with Connection(self.broker, connect_timeout=3) as conn:
                    conn.default_channel.queue_delete(self.queue)
                    if self.routing_key:
                        conn.default_channel.exchange_delete(f"{self.queue}-x")
            except Exception:  # best effort: the queue may never have been declared
                pass
        else:
            client = redis.Redis.from_url(self.broker)
            with contextlib.suppress(redis.RedisError):
                client.flushdb()  # the broker's database is this suite's alone
            client.close()


@contextlib.contextmanager
def opened_e2e(request: pytest.FixtureRequest, **fields: Any) -> Iterator[E2E]:
    """An ``E2E(**fields)`` whose workers' logs show when the test fails, closed after."""
    report_logs_on_failure(request.config)
    env = E2E(**fields)
    try:
        yield env
    finally:
        env.close()


def report_logs_on_failure(config: pytest.Config) -> None:
    """Register the plugin that shows worker logs when a test fails (once per session)."""
    e2e_support.report_logs_on_failure(config, "e2e", "celery worker logs")
