"""What one Prometheus scrape of a large namespace costs: ``RateLimitCollector`` on
``QRL_BENCH_SCRAPE_TENANTS`` tenants (default 10,000) and ``QRL_BENCH_SCRAPE_QUEUES``
queues (default 100).

The namespace: a ``tenant:*`` default of one job an hour, a global limit, a limit on every
queue, 50 tenants with a limit of their own and a concurrency cap for every tenant. Each
tenant sends three jobs to its queue (tenant i to queue i mod Q): one admitted, two denied,
so every tenant has counters and the denials zset is full; and parks one job in the fair
backlog of that queue (so every lane has its tenants' counts). Then ``QRL_BENCH_SCRAPES``
scrapes (default 20), each a full ``generate_latest``, timed on the client; the server
time and the commands come from ``INFO commandstats``, the round trips from counting
requests in redis-py.

``QRL_BENCH_SCRAPE_BASELINE=<git revision>`` also measures ``queue_ratelimit/metrics.py``
as it was at that revision, on the same data (it must import from today's package).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest

from queue_ratelimit import FairScheduler, Limit, Limiter
from queue_ratelimit._scheduler import SubmitItem

from ._common import (
    SCRIPT_COMMANDS,
    command_stats,
    env_int,
    log,
    machine_info,
    median,
    reset_command_stats,
    sig,
)

HOUR = 3600.0
BATCH = 500


class Requests:
    """What redis-py sent while ``count_requests`` was on: each command and each pipeline
    is one round trip."""

    count = 0


@contextmanager
def count_requests() -> Iterator[type[Requests]]:
    """Count the round trips of every redis-py client (synchronous ones) meanwhile."""
    command, execute = redis.Redis.execute_command, redis.client.Pipeline.execute

    def counted_command(client: Any, *args: Any, **options: Any) -> Any:
        Requests.count += 1
        return command(client, *args, **options)

    def counted_execute(pipe: Any, *args: Any, **options: Any) -> Any:
        Requests.count += 1
        return execute(pipe, *args, **options)

    Requests.count = 0
    redis.Redis.execute_command = counted_command  # type: ignore[method-assign]
    redis.client.Pipeline.execute = counted_execute  # type: ignore[method-assign]
    try:
        yield Requests
    finally:
        redis.Redis.execute_command = command  # type: ignore[method-assign]
        redis.client.Pipeline.execute = execute  # type: ignore[method-assign]


def _fill(limiter: Limiter, tenants: int, queues: int) -> None:
    limiter.set_limit("tenant:*", Limit(1, per=HOUR))
    limiter.set_limit("global", Limit(1e6))
    limiter.set_concurrency("tenant:*", 1000)
    for q in range(queues):
        limiter.set_limit(f"queue:q{q}", Limit(1e5))
    for t in range(50):
        limiter.set_limit(f"tenant:t{t}", Limit(2, per=HOUR))
    scheduler = FairScheduler(limiter)
    for start in range(0, tenants, BATCH):
        names = [(f"t{t}", f"q{t % queues}") for t in range(start, min(tenants, start + BATCH))]
        pipe = limiter.client.pipeline(transaction=False)
        for tenant, queue in names:
            for _ in range(3):
                limiter._scripts.queue(
                    pipe,
                    "acquire.lua",
                    [limiter.keys.tenant(tenant), limiter.keys.shared],
                    [queue, "", "1", "", "acquire", "3600000"],
                )
        pipe.execute()
        scheduler.submit_many([SubmitItem(t, f"job-{t}", queue=q) for t, q in names])
        log(f"  {start + len(names):,} tenants")


def _baseline(revision: str) -> types.ModuleType:
    """``queue_ratelimit/metrics.py`` at ``revision``, importing from today's package."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{revision}:queue_ratelimit/metrics.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = "queue_ratelimit._metrics_baseline"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "queue_ratelimit"
    sys.modules[name] = module
    exec(compile(source, f"{revision}:queue_ratelimit/metrics.py", "exec"), module.__dict__)
    return module


def _measure(collector: Any, admin: redis.Redis, scrapes: int) -> dict[str, Any]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry)  # warm up (script loading, connections)
    times = []
    reset_command_stats(admin)
    with count_requests() as requests:
        for _ in range(scrapes):
            started = time.perf_counter()
            text = generate_latest(registry)
            times.append(time.perf_counter() - started)
        trips = requests.count / scrapes
    stats = command_stats(admin)
    server_us = sum(s.usec for n, s in stats.items() if n not in SCRIPT_COMMANDS) / scrapes
    commands = sum(s.calls for n, s in stats.items() if n not in SCRIPT_COMMANDS) / scrapes
    times.sort()
    lines = text.decode().splitlines()
    return {
        "scrape_ms_median": sig(median(times) * 1000),
        "scrape_ms_p95": sig(times[int(0.95 * (len(times) - 1))] * 1000),
        "round_trips": sig(trips),
        "redis_commands": sig(commands),
        "redis_server_ms": sig(server_us / 1000),
        "series": sum(1 for line in lines if line and not line.startswith("#")),
        "bytes": len(text),
    }


def run(redis_url: str) -> dict[str, Any]:
    tenants = env_int("QRL_BENCH_SCRAPE_TENANTS", 10_000)
    queues = env_int("QRL_BENCH_SCRAPE_QUEUES", 100)
    scrapes = env_int("QRL_BENCH_SCRAPES", 20)
    baseline = os.environ.get("QRL_BENCH_SCRAPE_BASELINE")
    client = redis.Redis.from_url(redis_url)
    limiter = Limiter(client, namespace=f"scrape{uuid.uuid4().hex[:8]}")
    try:
        log(f"scrape: filling {tenants:,} tenants over {queues} queues")
        _fill(limiter, tenants, queues)
        from queue_ratelimit.metrics import RateLimitCollector

        result: dict[str, Any] = {
            "machine": machine_info(client),
            "tenants": tenants,
            "queues": queues,
            "scrapes": scrapes,
            "now": _measure(RateLimitCollector(limiter), client, scrapes),
        }
        log(f"  now: {result['now']}")
        if baseline:
            old = _baseline(baseline)
            result["baseline"] = {"revision": baseline}
            result["baseline"].update(_measure(old.RateLimitCollector(limiter), client, scrapes))
            log(f"  {baseline}: {result['baseline']}")
        return result
    finally:
        keys = list(client.scan_iter(match=f"{limiter.keys.base}:*", count=5000))
        for start in range(0, len(keys), 5000):
            client.delete(*keys[start : start + 5000])
        client.close()
