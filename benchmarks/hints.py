"""Producer hints against the measured start: real Celery and RQ workers, one Redis clock.

``python -m benchmarks hints`` prints one JSON object. A burst of jobs of one tenant is
enqueued at once into an idle worker; each job's hint (``result.rate_hint`` /
``job.rate_hint``) says how long after its enqueue it will start. Every job stamps its start
with Redis ``TIME`` (``benchmarks/_workers.py``) and the enqueue is stamped on the same
clock just before it, so the error of a hint is ``start - enqueue - hint.wait_ms``.

Scenarios:

1. ``burst``: the issue's example: 90 jobs at once into ``tenant:*`` 10/s burst 10. The 5th
   should be told about 0 ms and the 90th about 8 s; each start within 20% of its hint.
2. ``per_minute`` (only with ``QRL_HINT_SCENARIOS=burst,per_minute``: it takes 2 minutes a
   platform): 6 jobs into ``tenant:*`` 2/min burst 2 (0, 0, 30, 60, 90, 120 s).

Figures per platform and scenario: the hints and measured starts of the 5th and last jobs;
the absolute error (ms: median, p90, max) over all jobs; the relative error over the jobs
told to wait at least a second (median, max) and the share of those within 20%. Also
``left_counted``: jobs of the tenant still counted ahead once all ran (should be 0).

Celery: one prefork worker ``-c 2`` on the Redis broker (the next database); RQ: one
``queue-ratelimit rq worker --simple``. Environment: ``QRL_BENCH_ROUNDS`` (default 1),
``QRL_HINT_PLATFORMS`` (``celery,rq``), ``QRL_HINT_SCENARIOS`` (``burst``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from queue_ratelimit import FairScheduler, Limit, Limiter

from . import _workers as W
from ._common import env_int, log, machine_info, median, sig


@dataclass(frozen=True)
class Scenario:
    name: str
    limit: Limit
    jobs: int
    told_ms: tuple[float, float]  # what the 5th and the last job should be told


SCENARIOS = {
    "burst": Scenario("burst", Limit(10, burst=10), 90, (0.0, 8000.0)),
    "per_minute": Scenario("per_minute", Limit(2, per=60, burst=2), 6, (90_000.0, 120_000.0)),
}
TENANT = "acme"
TOLERANCE = 0.2  # the target: within 20%
LONG_MS = 1000.0  # relative errors are taken over hints of at least this


@dataclass(frozen=True, slots=True)
class Told:
    """One job: its id, when it was enqueued (Redis clock, s), the wait it was told and
    the jobs it was told were ahead of it."""

    job_id: str
    enqueued: float
    wait_ms: float
    ahead: int


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(scenario: Scenario, told: list[Told], starts: dict[str, float]) -> dict[str, Any]:
    """The figures of one run (see the module docstring)."""
    pairs = [
        (t.wait_ms, (starts[t.job_id] - t.enqueued) * 1000) for t in told if t.job_id in starts
    ]
    aheads = [t.ahead for t in told if t.job_id in starts]
    errors = [abs(start - hint) for hint, start in pairs]
    long = [(hint, start) for hint, start in pairs if hint >= LONG_MS]
    relative = [abs(start - hint) / hint for hint, start in long]
    fifth, last = min(4, len(told) - 1), len(told) - 1

    def job(n: int) -> dict[str, float | None]:
        start = starts.get(told[n].job_id)
        return {
            "hint_ms": sig(told[n].wait_ms),
            "start_ms": None if start is None else sig((start - told[n].enqueued) * 1000),
        }

    return {
        "ran": len(pairs),
        "of": len(told),
        "fifth": job(fifth),
        "last": job(last),
        "target_ms": {"fifth": scenario.told_ms[0], "last": scenario.told_ms[1]},
        "abs_error_ms": {
            "median": sig(median(errors)) if errors else None,
            "p90": sig(quantile(errors, 0.9)) if errors else None,
            "max": sig(max(errors)) if errors else None,
        },
        "rel_error_long": {
            "jobs": len(long),
            "median": sig(median(relative)) if relative else None,
            "max": sig(max(relative)) if relative else None,
            "within_20pct": sig(sum(r <= TOLERANCE for r in relative) / len(relative))
            if relative
            else None,
        },
        # Per job: told (ms), started after (ms), jobs told ahead.
        "jobs": [[sig(h, 5), sig(s, 5), a] for (h, s), a in zip(pairs, aheads, strict=True)],
    }


class Bench(W.Databases):
    """One run on one platform, in a fresh pair of databases."""

    def __init__(self, redis_url: str, logdir: Path) -> None:
        super().__init__(redis_url)
        self.logdir = logdir

    def _fresh(self, scenario: Scenario) -> tuple[str, Limiter]:
        namespace, limiter = self.fresh("hb")
        limiter.set_limit("tenant:*", scenario.limit)
        return namespace, limiter

    def _finish(
        self,
        scenario: Scenario,
        limiter: Limiter,
        queue: str,
        key: str,
        told: list[Told],
        workers: list[W.WorkerProcess],
    ) -> dict[str, Any]:
        last_ms = max(t.wait_ms for t in told)
        W.wait_for(
            lambda: self.client.llen(key) >= len(told),
            timeout=60 + 3 * last_ms / 1000,
            what=f"{len(told)} recorded starts",
            workers=workers,
        )
        starts = {r.job_id: r.start for r in W.read_runs(self.client, key)}
        result = summarise(scenario, told, starts)
        result["left_counted"] = FairScheduler(limiter).hint(TENANT, queue=queue).backlog
        return result

    def celery(self, scenario: Scenario) -> dict[str, Any]:
        namespace, limiter = self._fresh(scenario)
        queue, key = f"hb-{namespace}", f"wb:{namespace}:runs"
        common = self.celery_options(namespace, queue, key)
        workers: list[W.WorkerProcess] = []
        producer = W.build_celery_app(mode="fair", **common)
        try:
            workers = W.start_celery_workers(
                count=1, concurrency=2, mode="fair", logdir=self.logdir, **common
            )
            task = producer.tasks["bench.record"]
            told = []
            with producer.producer_or_acquire() as pub:
                for _ in range(scenario.jobs):
                    enqueued = W.redis_now(self.client)
                    result = task.apply_async(
                        (TENANT, "normal", 0.0), rate_tenant=TENANT, producer=pub
                    )
                    hint = result.rate_hint
                    told.append(Told(result.id, enqueued, hint.wait_ms, hint.backlog))
            return self._finish(scenario, limiter, queue, key, told, workers)
        finally:
            for w in workers:
                w.kill()
            W.uninstall_producer(producer)
            limiter.close()

    def rq(self, scenario: Scenario) -> dict[str, Any]:
        from queue_ratelimit.rq import Queue

        namespace, limiter = self._fresh(scenario)
        queue_name, key = f"hb-{namespace}", f"wb:{namespace}:runs"
        conn = redis.Redis.from_url(self.redis_url)
        workers: list[W.WorkerProcess] = []
        try:
            workers = W.start_rq_workers(
                count=1, redis_url=self.redis_url, namespace=namespace, queue=queue_name,
                ours=True, simple=True, logdir=self.logdir,
            )  # fmt: skip
            queue = Queue(queue_name, connection=conn, rate_namespace=namespace)
            told = []
            for _ in range(scenario.jobs):
                enqueued = W.redis_now(self.client)
                job = queue.enqueue(W.rq_record, key, TENANT, "normal", 0.0, rate_tenant=TENANT)
                hint = job.rate_hint  # type: ignore[attr-defined]
                told.append(Told(job.id, enqueued, hint.wait_ms, hint.backlog))
            return self._finish(scenario, limiter, queue_name, key, told, workers)
        finally:
            for w in workers:
                w.kill()
            conn.close()
            limiter.close()


def run(redis_url: str) -> dict[str, Any]:
    rounds = env_int("QRL_BENCH_ROUNDS", 1)
    platforms = os.environ.get("QRL_HINT_PLATFORMS", "celery,rq").split(",")
    names = os.environ.get("QRL_HINT_SCENARIOS", "burst").split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; known: {sorted(SCENARIOS)}")
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / "qrl-bench-hints"
    logdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(redis_url, logdir)
    runners: dict[str, Callable[[Scenario], dict[str, Any]]] = {
        "celery": bench.celery,
        "rq": bench.rq,
    }
    results: dict[str, Any] = {
        "setup": {
            "tenant": TENANT,
            "tolerance": TOLERANCE,
            "rounds": rounds,
            "celery": "1 prefork worker -c 2, Redis broker",
            "rq": "1 queue-ratelimit rq worker --simple",
            "logs": str(logdir),
        },
        "machine": machine_info(bench.client),
    }
    try:
        for platform in platforms:
            for name in names:
                scenario = SCENARIOS[name]
                for n in range(rounds):
                    log(f"-- {platform} {name} round {n + 1}/{rounds}")
                    started = time.perf_counter()
                    outcome = runners[platform](scenario)
                    log(
                        f"   5th told {outcome['fifth']['hint_ms']} ms, started after "
                        f"{outcome['fifth']['start_ms']} ms; last told "
                        f"{outcome['last']['hint_ms']} ms, started after "
                        f"{outcome['last']['start_ms']} ms "
                        f"({time.perf_counter() - started:.1f} s)"
                    )
                    results.setdefault(platform, {}).setdefault(name, []).append(outcome)
    finally:
        bench.client.flushdb()
        bench.broker_client.flushdb()
        bench.close()
    return results
