"""Fair dispatch of worker capacity: real Celery and RQ workers, jobs stamped on Redis's clock.

``python -m benchmarks worker_fairness`` prints one JSON object. Every job records its start
and end with Redis ``TIME`` (``benchmarks/_workers.py``); every figure is computed from those
records. Celery: 2 prefork workers ``-c 2`` (4 pool processes), Redis broker in the next
database of the same server. RQ: 2 workers, ``SimpleWorker`` by default
(``QRL_WF_RQ_WORKER=fork`` for forking workers). Scenarios:

1. ``quiet_behind_noisy``: no cap binds (``global`` huge), the workers are the bottleneck.
   Tenant ``noisy`` enqueues N jobs of 10 ms, then tenant ``quiet`` enqueues 10, all before
   the workers start. Figures: seconds from the first job's start to the quiet tenant's last
   job's end (target <= 3 s), the whole run's seconds, and their ratio to the baseline
   (the throughput cost of fairness). Modes, rotated round by round in the same run:
   Celery ``fair`` (``install``, ``fair_capacity=True``), ``fifo`` (``install``,
   ``fair_capacity=False``), ``plain`` (no ``install``); RQ ``ours`` (``queue-ratelimit rq
   worker``, our ``Queue``) and ``stock`` (``rq worker``, plain ``rq.Queue``).
2. ``priorities_workers``: one tenant, high and low jobs of 10 ms enqueued alternately, no
   cap binds; (a) ``backlog_first`` (enqueued before the workers start), (b)
   ``workers_first``. high:low among the jobs started while both were backlogged (ordered
   by start, the first ``skip`` left out, up to the last high job's start). Target 3 ± 0.15.
3. ``tenant_weights_workers``: tenants ``premium`` (weight 5) and ``standard`` (1), same
   shape. Target 5 ± 5%.
4. ``priorities_cap`` / ``tenant_weights_cap``: the same two, workers first, under a
   binding ``global`` cap (default 20/s burst 2), jobs of 1 ms.

Every run also checks that every job ran exactly once.

Environment: ``QRL_BENCH_ROUNDS`` (rounds of every scenario, default 2),
``QRL_WF_CELERY_NOISY`` (default 3000), ``QRL_WF_RQ_NOISY`` (600), ``QRL_WF_PRIORITY_JOBS``
(jobs per class in scenarios 2 and 4, default 120), ``QRL_WF_WEIGHT_JOBS`` (per tenant in
3 and 4, default 120), ``QRL_WF_CAP_RATE`` (default 20), ``QRL_WF_RQ_WORKER`` (``simple`` or
``fork``), ``QRL_WF_SCENARIOS`` (comma-separated names, default all),
``QRL_WF_PLATFORMS`` (``celery,rq``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from queue_ratelimit import FairScheduler, Limit, Limiter

from . import _workers as W
from ._common import env_int, log, machine_info, median, sig

NEVER_BINDS = Limit(1_000_000, burst=1_000_000)
CELERY_WORKERS, CELERY_CONCURRENCY = 2, 2
RQ_WORKERS = 2
WORK_S = 0.01  # a worker-bound job
CAP_WORK_S = 0.001  # a job under a binding cap
QUIET_JOBS = 10
QUIET_TARGET_S = 3.0
PRIORITY_TARGET = (3.0, 0.15)  # value, allowed absolute deviation
WEIGHT_TARGET = (5.0, 0.25)  # 5 ± 5%
SKIP = {"celery": 20, "rq": 10}  # jobs taken before the backlog existed, left out
SCENARIOS = (
    "quiet_behind_noisy",
    "priorities_workers",
    "tenant_weights_workers",
    "priorities_cap",
    "tenant_weights_cap",
)

Job = tuple[str, str, float]  # tenant, priority, seconds of work


@dataclass
class Setup:
    """What one run configures before any job is enqueued."""

    limits: dict[str, Limit] = field(default_factory=lambda: {"global": NEVER_BINDS})
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class Outcome:
    """One run: the records, the ids enqueued, and when the waiting list drained."""

    runs: list[W.Run]
    ids: list[str]
    drained_at: float | None  # Redis time the broker queue / RQ list was first seen empty
    workers_ready_at: float

    def exactly_once(self) -> dict[str, int]:
        counts = Counter(r.job_id for r in self.runs)
        return {
            "enqueued": len(self.ids),
            "ran": len(counts),
            "missing": len(set(self.ids) - set(counts)),
            "ran_twice": sum(1 for n in counts.values() if n > 1),
            "unknown": len(set(counts) - set(self.ids)),
        }


class Bench(W.Databases):
    """Runs one scenario run on one platform, in a fresh pair of databases."""

    def __init__(self, redis_url: str, logdir: Path, rq_simple: bool) -> None:
        super().__init__(redis_url)
        self.logdir = logdir
        self.rq_simple = rq_simple

    def _fresh(self, setup: Setup) -> tuple[str, Limiter]:
        namespace, limiter = self.fresh("wf")
        for scope, limit in setup.limits.items():
            limiter.set_limit(scope, limit)
        scheduler = FairScheduler(limiter)
        for tenant, weight in setup.weights.items():
            scheduler.set_tenant_weight(tenant, weight)
        return namespace, limiter

    def _wait_all(
        self,
        key: str,
        count: int,
        waiting: Callable[[], int],
        workers: list[W.WorkerProcess],
    ) -> float | None:
        """Wait until ``count`` executions are recorded (or a generous timeout passes: the
        result then shows what is missing); returns when ``waiting()`` first read 0."""
        drained_at = None
        deadline = time.monotonic() + 60 + count * 0.2
        while self.client.llen(key) < count:
            if drained_at is None and waiting() == 0:
                drained_at = W.redis_now(self.client)
            if time.monotonic() > deadline or not all(w.alive() for w in workers):
                log(f"   !! gave up waiting: {self.client.llen(key)} of {count} recorded")
                for w in workers:
                    log(f"   --- {w.name} ({w.log})\n{w.tail()}")
                break
            time.sleep(0.02)
        time.sleep(0.5)  # a job run twice would show up now
        return drained_at

    def celery(self, mode: str, jobs: list[Job], setup: Setup, *, backlog_first: bool) -> Outcome:
        namespace, limiter = self._fresh(setup)
        queue, key = f"wf-{namespace}", f"wb:{namespace}:runs"
        common = self.celery_options(namespace, queue, key)
        producer = W.build_celery_app(mode="producer", **common)
        task = producer.tasks["bench.record"]
        ids: list[str] = []

        def publish() -> None:
            with producer.producer_or_acquire() as pub:
                for tenant, priority, sleep in jobs:
                    result = task.apply_async(
                        (tenant, priority, sleep), rate_tenant=tenant, rate_priority=priority,
                        producer=pub,
                    )  # fmt: skip
                    ids.append(result.id)

        workers: list[W.WorkerProcess] = []
        try:
            if backlog_first:
                publish()
            workers = W.start_celery_workers(
                count=CELERY_WORKERS, concurrency=CELERY_CONCURRENCY, mode=mode,
                logdir=self.logdir, **common,
            )  # fmt: skip
            ready = W.redis_now(self.client)
            if not backlog_first:
                publish()
            drained = self._wait_all(
                key, len(jobs), lambda: int(self.broker_client.llen(queue)), workers
            )
            runs = W.read_runs(self.client, key)
        finally:
            for w in workers:
                w.kill()
            W.uninstall_producer(producer)
            limiter.close()
        return Outcome(runs, ids, drained, ready)

    def rq(self, mode: str, jobs: list[Job], setup: Setup, *, backlog_first: bool) -> Outcome:
        import rq

        from queue_ratelimit.rq import Queue

        namespace, limiter = self._fresh(setup)
        queue_name, key = f"wf-{namespace}", f"wb:{namespace}:runs"
        ours = mode == "ours"
        conn = redis.Redis.from_url(self.redis_url)
        ids: list[str] = []

        def enqueue() -> None:
            if ours:
                ours_q = Queue(queue_name, connection=conn, rate_namespace=namespace)
                for tenant, priority, sleep in jobs:
                    job = ours_q.enqueue(W.rq_record, key, tenant, priority, sleep,
                                         rate_tenant=tenant, rate_priority=priority)  # fmt: skip
                    ids.append(job.id)
            else:
                plain = rq.Queue(queue_name, connection=conn)
                for tenant, priority, sleep in jobs:
                    job = plain.enqueue(W.rq_record, key, tenant, priority, sleep,
                                        meta={"rate_tenant": tenant})  # fmt: skip
                    ids.append(job.id)

        workers: list[W.WorkerProcess] = []
        try:
            if backlog_first:
                enqueue()
            workers = W.start_rq_workers(
                count=RQ_WORKERS, redis_url=self.redis_url, namespace=namespace,
                queue=queue_name, ours=ours, simple=self.rq_simple, logdir=self.logdir,
            )  # fmt: skip
            ready = W.redis_now(self.client)
            if not backlog_first:
                enqueue()
            drained = self._wait_all(
                key, len(jobs), lambda: int(conn.llen(f"rq:queue:{queue_name}")), workers
            )
            runs = W.read_runs(self.client, key)
        finally:
            for w in workers:
                w.kill()
            conn.close()
            limiter.close()
        return Outcome(runs, ids, drained, ready)


# -- figures ----------------------------------------------------------------------------------
def quiet_figures(out: Outcome) -> dict[str, Any]:
    runs = out.runs
    t0 = runs[0].start
    quiet = [r for r in runs if r.tenant == "quiet"]
    order = [r.job_id for r in runs]
    return {
        "quiet_done_s": sig(max(r.end for r in quiet) - t0, 3) if quiet else None,
        "quiet_first_start_s": sig(min(r.start for r in quiet) - t0, 3) if quiet else None,
        "total_s": sig(max(r.end for r in runs) - t0, 4),
        "last_quiet_position": max(order.index(r.job_id) for r in quiet) if quiet else None,
        # How long the workers took to take every waiting message off the broker queue
        # (Celery) / RQ's list (RQ), from the first job's start; None: never seen empty.
        "list_drained_s": sig(out.drained_at - t0, 3) if out.drained_at else None,
        # The first job's start after the moment every worker was ready (negative: the
        # first worker started work before the last one was ready).
        "first_start_after_ready_s": sig(t0 - out.workers_ready_at, 3),
        **out.exactly_once(),
    }


def share(
    runs: list[W.Run], classify: Callable[[W.Run], str], a: str, b: str, skip: int
) -> dict[str, Any]:
    """Runs of class ``a`` per run of ``b`` among the jobs started while both were waiting:
    ordered by start, the first ``skip`` left out, up to the last start of ``a``."""
    ordered = runs[skip:]
    classes = [classify(r) for r in ordered]
    if a not in classes:
        return {"ratio": None, a: 0, b: classes.count(b)}
    end = max(i for i, c in enumerate(classes) if c == a)
    window = classes[: end + 1]
    na, nb = window.count(a), window.count(b)
    return {"ratio": sig(na / nb, 4) if nb else None, a: na, b: nb}


def verdict(values: list[float | None], target: tuple[float, float]) -> dict[str, Any]:
    good = [v for v in values if v is not None]
    value, tolerance = target
    mid = median(good) if good else None
    return {
        "median": sig(mid, 4) if mid is not None else None,
        "per_round": values,
        "target": f"{value} ± {tolerance}",
        "met": mid is not None and abs(mid - value) <= tolerance,
        "every_round_met": len(good) == len(values) > 0
        and all(abs(v - value) <= tolerance for v in good),
    }


# -- scenarios --------------------------------------------------------------------------------
def _quiet_behind_noisy(bench: Bench, platform: str, rounds: int, noisy: int) -> dict[str, Any]:
    modes = ["fair", "fifo", "plain"] if platform == "celery" else ["ours", "stock"]
    ours = modes[0]
    jobs: list[Job] = [("noisy", "normal", WORK_S)] * noisy
    jobs += [("quiet", "normal", WORK_S)] * QUIET_JOBS
    per_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for mode in order:
            run = getattr(bench, platform)(mode, jobs, Setup(), backlog_first=True)
            figures = quiet_figures(run)
            per_mode[mode].append(figures)
            log(
                f"   {platform} quiet_behind_noisy round {r + 1} {mode}: quiet done "
                f"{figures['quiet_done_s']} s, total {figures['total_s']} s, list drained "
                f"{figures['list_drained_s']} s, missing {figures['missing']}, "
                f"twice {figures['ran_twice']}"
            )
    out: dict[str, Any] = {
        "jobs": {"noisy": noisy, "quiet": QUIET_JOBS, "work_s": WORK_S},
        "enqueued": "noisy, then quiet, all before the workers start",
        "round_orders": [modes[r % len(modes) :] + modes[: r % len(modes)] for r in range(rounds)],
        "per_round": per_mode,
    }
    for mode, rows in per_mode.items():
        done = [row["quiet_done_s"] for row in rows if row["quiet_done_s"] is not None]
        out[mode] = {
            # None when the quiet tenant never ran (the run timed out: see "missing").
            "quiet_done_s": sig(median(done), 3) if done else None,
            "total_s": sig(median(row["total_s"] for row in rows), 4),
            "list_drained_s": [row["list_drained_s"] for row in rows],
            "exactly_once": all(row["missing"] == row["ran_twice"] == 0 for row in rows),
        }
    quiet_done = [row["quiet_done_s"] for row in per_mode[ours]]
    out["quiet_done_target"] = {
        "median_s": out[ours]["quiet_done_s"],
        "per_round_s": quiet_done,
        "target": f"<= {QUIET_TARGET_S} s",
        "met": out[ours]["quiet_done_s"] is not None
        and out[ours]["quiet_done_s"] <= QUIET_TARGET_S,
        "baseline_median_s": {m: out[m]["quiet_done_s"] for m in modes[1:]},
    }
    for base in modes[1:]:
        ratios = [
            row["total_s"] / other["total_s"]
            for row, other in zip(per_mode[ours], per_mode[base], strict=True)
        ]
        out[f"total_ratio_{ours}_over_{base}"] = {
            "median": sig(median(ratios), 3),
            "per_round": [sig(x, 3) for x in ratios],
        }
    return out


def _share_scenario(
    bench: Bench,
    platform: str,
    rounds: int,
    *,
    kind: str,
    count: int,
    cap: Limit | None,
    variants: tuple[bool, ...],
) -> dict[str, Any]:
    """Priorities (``kind="priorities"``) or tenant weights (``"weights"``), ours only."""
    mode = "fair" if platform == "celery" else "ours"
    if kind == "priorities":
        a, b, target = "high", "low", PRIORITY_TARGET
        pairs = [("acme", "low"), ("acme", "high")]
        setup = Setup()

        def classify(r: W.Run) -> str:
            return r.priority
    else:
        a, b, target = "premium", "standard", WEIGHT_TARGET
        pairs = [("standard", "normal"), ("premium", "normal")]
        setup = Setup(weights={"premium": 5, "standard": 1})

        def classify(r: W.Run) -> str:
            return r.tenant

    work = WORK_S if cap is None else CAP_WORK_S
    if cap is not None:
        setup.limits = {"global": cap}
    jobs: list[Job] = [(t, p, work) for _ in range(count) for t, p in pairs]
    skip = SKIP[platform]
    out: dict[str, Any] = {
        "jobs": {a: count, b: count, "work_s": work, "enqueued": f"{b}, {a}, {b}, {a}, ..."},
        "cap": None if cap is None else f"global {cap.rate:g}/s burst {cap.burst:g}",
        "skip": skip,
    }
    for backlog_first in variants:
        name = "backlog_first" if backlog_first else "workers_first"
        rows = []
        for r in range(rounds):
            run = getattr(bench, platform)(mode, jobs, setup, backlog_first=backlog_first)
            got = share(run.runs, classify, a, b, skip)
            # Also with no job left out, to show what the skip changes.
            got["ratio_skip_0"] = share(run.runs, classify, a, b, 0)["ratio"]
            # The classes in start order (first letters), to see where the ratio drifts.
            got["sequence"] = "".join(classify(r)[0] for r in run.runs)
            got.update(run.exactly_once())
            rows.append(got)
            log(
                f"   {platform} {kind} cap={cap is not None} {name} round {r + 1}: "
                f"{a}:{b} = {got['ratio']} ({got[a]}:{got[b]}), missing {got['missing']}, "
                f"twice {got['ran_twice']}"
            )
        out[name] = {
            f"{a}_to_{b}": verdict([row["ratio"] for row in rows], target),
            "rounds": rows,
            "exactly_once": all(row["missing"] == row["ran_twice"] == 0 for row in rows),
        }
    return out


def run(redis_url: str) -> dict[str, Any]:
    rounds = env_int("QRL_BENCH_ROUNDS", 2)
    noisy = {"celery": env_int("QRL_WF_CELERY_NOISY", 3000), "rq": env_int("QRL_WF_RQ_NOISY", 600)}
    prio_jobs = env_int("QRL_WF_PRIORITY_JOBS", 120)
    weight_jobs = env_int("QRL_WF_WEIGHT_JOBS", 120)
    cap = Limit(env_int("QRL_WF_CAP_RATE", 20), burst=2)
    rq_worker = os.environ.get("QRL_WF_RQ_WORKER", "simple")
    if rq_worker not in ("simple", "fork"):
        raise ValueError(f"QRL_WF_RQ_WORKER must be simple or fork, got {rq_worker!r}")
    scenarios = [s for s in os.environ.get("QRL_WF_SCENARIOS", ",".join(SCENARIOS)).split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}; known: {SCENARIOS}")
    platforms = [p for p in os.environ.get("QRL_WF_PLATFORMS", "celery,rq").split(",") if p]
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / "qrl-bench-worker-fairness"
    logdir.mkdir(parents=True, exist_ok=True)

    bench = Bench(redis_url, logdir, rq_simple=rq_worker == "simple")
    import celery
    import rq

    result: dict[str, Any] = {
        "config": {
            "rounds": rounds,
            "celery": f"{celery.__version__}, {CELERY_WORKERS} workers -P prefork "
            f"-c {CELERY_CONCURRENCY}, Redis broker (next database of the same server)",
            "rq": f"{rq.__version__}, {RQ_WORKERS} workers, "
            + ("SimpleWorker" if bench.rq_simple else "forking Worker"),
            "logs": str(logdir),
        },
        "machine": {**machine_info(bench.client), "loadavg_start": os.getloadavg()},
    }
    try:
        for platform in platforms:
            got: dict[str, Any] = {}
            for scenario in scenarios:
                log(f"== worker_fairness: {platform} {scenario}")
                if scenario == "quiet_behind_noisy":
                    got[scenario] = _quiet_behind_noisy(bench, platform, rounds, noisy[platform])
                    continue
                kind = "priorities" if scenario.startswith("priorities") else "weights"
                capped = scenario.endswith("_cap")
                got[scenario] = _share_scenario(
                    bench, platform, rounds, kind=kind,
                    count=prio_jobs if kind == "priorities" else weight_jobs,
                    cap=cap if capped else None,
                    variants=(False,) if capped else (True, False),
                )  # fmt: skip
            result[platform] = got
    finally:
        result["machine"]["loadavg_end"] = os.getloadavg()
        bench.client.flushdb()
        bench.broker_client.flushdb()
        bench.close()
    return result


if __name__ == "__main__":
    url = os.environ.get("REDIS_URL")
    if not url:
        sys.exit("set REDIS_URL (tests/run_with_redis.sh starts a throwaway server)")
    json.dump(run(url), sys.stdout, indent=2)
    sys.stdout.write("\n")
