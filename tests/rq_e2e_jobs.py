"""Job functions for the RQ end-to-end tests: every execution is recorded in Redis.

A worker imports this module by name (``rq_e2e_jobs.record``). Each execution appends
``"<job id> <tenant> <redis TIME>"`` to the list ``key`` in the Redis named by
``$QRL_E2E_RECORD`` (a server that never restarts, so records survive a restart of the
server the jobs live on). The record is written when the job starts: that is the moment
closest to its admission, and a job killed mid-run still shows that it ran.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from rq import get_current_job

# The options our queue takes out of the call; a job must never see one.
RATE_OPTIONS = ("rate_tenant", "rate_priority", "rate_cost")

_clients: dict[str, redis.Redis] = {}


def _records() -> redis.Redis:
    url = os.environ["QRL_E2E_RECORD"]
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = redis.Redis.from_url(url)
    return client


def record(key: str, *args: Any, sleep: float = 0.0, fail_times: int = 0, **kwargs: Any) -> int:
    """Record this execution, then sleep ``sleep`` s (and record its end in ``<key>:end``);
    fail the first ``fail_times`` runs.

    Raises:
        AssertionError: a rate option reached the function (so nothing is recorded).
        RuntimeError: a deliberate failure (for retries).
    """
    leaked = [k for k in kwargs if k in RATE_OPTIONS or k.startswith("rate_")]
    assert not leaked, f"rate options reached the job function: {leaked}"
    job = get_current_job()
    assert job is not None
    # Other code may have put anything in the meta (the tests do): recorded as "-" then.
    given = job.meta.get("rate_tenant") if isinstance(job.meta, dict) else None
    tenant = given if isinstance(given, str) and given and given.isprintable() else "-"
    tenant = tenant if " " not in tenant else "-"
    client = _records()
    seconds, micros = client.time()
    client.rpush(key, f"{job.id} {tenant} {seconds}.{micros:06d}")
    if fail_times:
        attempt = client.incr(f"{key}:attempts:{job.id}")
        if attempt <= fail_times:
            raise RuntimeError(f"deliberate failure {attempt} of {fail_times}")
    if sleep:
        time.sleep(sleep)
        seconds, micros = client.time()
        client.rpush(f"{key}:end", f"{job.id} {tenant} {seconds}.{micros:06d}")
    return len(args)


class Unreadable:
    """A value other code may pickle into a job's meta (or a Celery message): every method
    a reader might call on it raises."""

    def __repr__(self) -> str:
        raise RuntimeError("repr")

    def __hash__(self) -> int:
        raise RuntimeError("hash")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")

    def __bool__(self) -> bool:
        raise RuntimeError("bool")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text("Unreadable()")  # how hypothesis shows it in a failing example


def partner(key: str, retry_after: float = 1.5) -> None:
    """Call a fake partner API (a counter in the records' Redis) that answers 429 to the
    call numbered ``<key>:fails_at`` (once): then pause the job's tenant and hand the job
    back (``pause_and_requeue``), after recording ``"<job id> <tenant> <now> <until>"`` in
    ``<key>:429`` on Redis's clock; any other call records the run as ``record`` does."""
    from queue_ratelimit.rq import pause_and_requeue, pause_current_scope

    client = _records()
    if client.incr(f"{key}:calls") == int(client.get(f"{key}:fails_at") or 0):
        pause = pause_current_scope(retry_after)
        job = get_current_job()
        assert job is not None
        seconds, micros = client.time()
        tenant = job.meta.get("rate_tenant", "-")
        client.rpush(f"{key}:429", f"{job.id} {tenant} {seconds}.{micros:06d} {pause.until_ms}")
        pause_and_requeue(retry_after)
    record(key)
