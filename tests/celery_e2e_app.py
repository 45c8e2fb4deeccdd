"""The Celery app the end-to-end tests run in real workers, configured from the environment.

Workers start it with ``celery -A celery_e2e_app worker`` (from this folder); tests that
publish from their own process build one with ``build_app``. Every task records each
execution in Redis (``RPUSH`` of a JSON line stamped with Redis ``TIME``), so a test can
count executions exactly and check when each ran on one clock.

Environment (for the worker's module-level ``app``):
    QRL_E2E_BROKER: the broker URL (required).
    QRL_E2E_REDIS: the limiter's Redis URL.
    QRL_E2E_RECORD: where executions are recorded (default: the limiter's Redis).
    QRL_E2E_NAMESPACE: the limiter namespace; also names the record keys.
    QRL_E2E_QUEUE: the default queue (each test uses a queue of its own).
    QRL_E2E_ACKS_LATE: "1" for ``task_acks_late``.
    QRL_E2E_SETTINGS: JSON object merged into ``app.conf.queue_ratelimit``.
    QRL_E2E_BACKEND: a result backend URL (results are stored only when it is set; chords
        need one).
    QRL_E2E_ROUTING_KEY: when set, the queue is bound to a topic exchange of its own
        (``<queue>-x``) as ``<key>.#``, and tasks are published to it as ``<key>.jobs``:
        routing keys that are not queue names.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready
from kombu import Exchange, Queue

from queue_ratelimit.celery import install

_RECORD_SCRIPT = """
local t = redis.call('TIME')
local stamp = t[1] .. '.' .. string.format('%06d', t[2])
redis.call('RPUSH', KEYS[1], ARGV[1] .. '"t": ' .. stamp .. '}')
return 1
"""


def runs_key(namespace: str) -> str:
    """The list every execution is pushed to."""
    return f"e2e:{namespace}:runs"


def ready_key(namespace: str) -> str:
    """The hash workers write their hostname to once they consume."""
    return f"e2e:{namespace}:ready"


def release_key(namespace: str) -> str:
    """The list ``e2e.hold`` tasks wait on: each item pushed lets one go."""
    return f"e2e:{namespace}:release"


class _Recorder:
    """A Redis client per process, made on first use (prefork children connect after fork)."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self._client: redis.Redis | None = None
        self._script: Any = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.url)
            self._script = self._client.register_script(_RECORD_SCRIPT)
        return self._client

    def record(self, task: Any, event: str, **extra: Any) -> None:
        request = task.request
        fields = {
            "id": request.id,
            "task": task.name,
            "event": event,
            "tenant": _header(request, "qrl_tenant"),
            "priority": _header(request, "qrl_priority"),
            "retries": request.retries or 0,
            "host": request.hostname,
            "pid": os.getpid(),
            **extra,
        }
        # The time goes in last, from Redis's clock, inside the same atomic call.
        prefix = json.dumps(fields)[:-1] + ", "
        _ = self.client
        self._script(keys=[runs_key(self.namespace)], args=[prefix])


def _header(request: Any, name: str) -> Any:
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def build_app(
    *,
    broker: str,
    redis_url: str,
    namespace: str,
    queue: str,
    record_url: str | None = None,
    acks_late: bool = False,
    settings: Mapping[str, Any] | None = None,
    enabled: bool = True,
    backend: str | None = None,
    routing_key: str = "",
) -> Celery:
    """A Celery app with queue-ratelimit installed and the recording tasks registered."""
    app = Celery(f"e2e-{namespace}", broker=broker, backend=backend or None)
    if routing_key:
        # (Celery publishes to a direct exchange's queue by its name, through the default
        # exchange, unless a route names the exchange: hence a topic exchange and a route.
        # The route declares the queue: a Redis producer routes by the exchanges it knows.)
        bound = Queue(queue, Exchange(f"{queue}-x", type="topic"), routing_key=f"{routing_key}.#")
        app.conf.update(
            task_queues=[bound],
            task_routes={
                "e2e.*": {
                    "exchange": bound.exchange.name,
                    "exchange_type": "topic",
                    "routing_key": f"{routing_key}.jobs",
                    "declare": [bound],
                }
            },
        )
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=acks_late,
        task_ignore_result=not backend,
        result_expires=300,  # results (when there is a backend) expire on their own
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        # A message reserved by a killed worker comes back in seconds, not in an hour.
        broker_transport_options={"visibility_timeout": 20},
        worker_hijack_root_logger=True,
        queue_ratelimit={"namespace": namespace, "redis_url": redis_url, **(settings or {})},
    )
    if enabled:
        install(app)
    recorder = _Recorder(record_url or redis_url, namespace)

    @app.task(bind=True, shared=False, name="e2e.work")
    def work(self: Any, tag: str = "", sleep: float = 0.0) -> None:
        """Record the execution (first thing), then sleep ``sleep`` seconds."""
        recorder.record(self, "run", tag=tag)
        if sleep:
            time.sleep(sleep)
            recorder.record(self, "done", tag=tag)

    @app.task(bind=True, shared=False, name="e2e.hold")
    def hold(self: Any, tag: str = "", timeout: float = 120.0) -> None:
        """Record the execution, then keep the process busy until the test lets one held
        task go (an item pushed onto ``release_key``), at most ``timeout`` seconds."""
        recorder.record(self, "run", tag=tag)
        recorder.client.blpop([release_key(namespace)], timeout)
        recorder.record(self, "done", tag=tag)

    @app.task(bind=True, shared=False, name="e2e.replaced")
    def replaced(self: Any, tag: str = "") -> Any:
        """Record the execution (event "replaced"), then replace itself by ``e2e.work``,
        which runs with this task's id (``Task.replace``)."""
        recorder.record(self, "replaced", tag=tag)
        return self.replace(work.si(f"{tag}-replacement"))

    @app.task(bind=True, shared=False, name="e2e.flaky", max_retries=3)
    def flaky(self: Any, tag: str = "") -> None:
        """Record the execution; the first one retries itself (with a short countdown)."""
        recorder.record(self, "run", tag=tag)
        if not self.request.retries:
            raise self.retry(countdown=0.3)

    @app.task(
        bind=True, shared=False, name="e2e.decorated", rate_tenant="decor", rate_priority="low"
    )
    def decorated(self: Any, tag: str = "") -> None:
        """Record the execution; rate options come from the decorator."""
        recorder.record(self, "run", tag=tag)

    @app.task(bind=True, shared=False, name="e2e.limited", rate_limit="5/s")
    def limited(self: Any, tag: str = "") -> None:
        """Record the execution; Celery's own per-task rate limit applies (5/s)."""
        recorder.record(self, "run", tag=tag)

    @app.task(bind=True, shared=False, name="e2e.partner", max_retries=0)
    def partner(self: Any, tag: str = "", retry_after: float = 1.5, scope: str = "tenant") -> None:
        """Call a fake partner API (a counter in Redis) that answers 429 to the call
        numbered ``tag``'s key says (once): then pause ``scope`` (the tenant by default)
        and hand the task back (event "429", with the pause's end on Redis's clock and
        the scope paused); else record the run."""
        client = recorder.client
        if client.incr(f"e2e:{namespace}:partner:calls") == int(
            client.get(f"e2e:{namespace}:partner:fails_at") or 0
        ):
            from queue_ratelimit.celery import pause_and_retry, pause_scope

            pause = pause_scope(self, retry_after, scope=scope)
            recorder.record(self, "429", tag=tag, until_ms=pause.until_ms, scope=pause.scope)
            pause_and_retry(self, retry_after, scope=scope)
        recorder.record(self, "run", tag=tag)

    @app.task(shared=False, name="e2e.noop")
    def noop() -> None:
        """Does nothing (for throughput)."""

    @worker_ready.connect(weak=False)
    def announce(sender: Any = None, **_: Any) -> None:
        client = redis.Redis.from_url(record_url or redis_url)
        try:
            client.hset(ready_key(namespace), str(getattr(sender, "hostname", "?")), os.getpid())
        finally:
            client.close()

    return app


def _from_env() -> Celery | None:
    env = os.environ
    if "QRL_E2E_BROKER" not in env:
        return None
    return build_app(
        broker=env["QRL_E2E_BROKER"],
        redis_url=env["QRL_E2E_REDIS"],
        namespace=env["QRL_E2E_NAMESPACE"],
        queue=env["QRL_E2E_QUEUE"],
        record_url=env.get("QRL_E2E_RECORD") or None,
        acks_late=env.get("QRL_E2E_ACKS_LATE") == "1",
        settings=json.loads(env.get("QRL_E2E_SETTINGS") or "{}"),
        enabled=env.get("QRL_E2E_INSTALL", "1") == "1",
        backend=env.get("QRL_E2E_BACKEND") or None,
        routing_key=env.get("QRL_E2E_ROUTING_KEY") or "",
    )


app = _from_env()
