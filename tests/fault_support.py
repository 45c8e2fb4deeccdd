"""What the fault scenarios share (tests/test_faults.py): a limiter Redis of their own that
they may stop, kill or flush, real Celery and RQ workers on it, a producer publishing
through both for the length of a scenario, and the figures that say what a fault did.

Celery's broker and every job's record live on the suite's Redis (never faulted); RQ keeps
its jobs on the limiter's Redis, as RQ deployments do, so a fault there is one for RQ too.
Jobs are ``benchmarks._workers``'s recording job: each run is a line with its start on
Redis's clock (the records server's, the same host's clock as this process's).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery_harness import AMQP_URL, amqp_unreachable_reason, redis_broker_url, wait_for
from conftest import RedisProcess
from kombu import Connection

from benchmarks import _workers as W
from queue_ratelimit import Limit, Limiter
from queue_ratelimit.rq import Queue

# Every limit in a scenario: low enough that parked backlogs form (the producer offers
# more), so a fault finds work parked, in flight and running.
TENANT_LIMIT = Limit(8, burst=2)
TENANTS = ("a", "b", "c")
# Seconds a re-admitted job's lease lasts (Celery ``lease``, RQ ``QUEUE_RATELIMIT_LEASE``):
# short, so that what a fault strands comes back within a scenario.
LEASE = 5.0
# The client timeouts of this process's own calls to the limiter's Redis.
CLIENT_TIMEOUT = 2.0


JOB_SECONDS = 0.02  # each job's run


def report(name: str, figures: dict[str, Any]) -> None:
    """What a scenario measured: printed (``pytest -s``), and appended as a JSON line to
    ``$QRL_FAULTS_REPORT`` when set (docs/reliability.md, "Faults", is written from it)."""
    line = json.dumps({"scenario": name, **figures}, sort_keys=True)
    print(line)
    path = os.environ.get("QRL_FAULTS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


@dataclass
class Published:
    """A job handed to a producer: its framework, tenant, and when (wall clock, s)."""

    framework: str
    tenant: str
    at: float
    refused: str = ""  # the error the producer raised (the job may exist all the same)


@dataclass
class FaultEnv:
    """One scenario's limiter Redis, workers, producer and records."""

    server: RedisProcess
    records_url: str
    workdir: Path
    acks_late: bool = False
    job_seconds: float = JOB_SECONDS
    # Longer than the longest stall a scenario makes (the lease must outlast an outage: a
    # job's settlement that cannot reach Redis waits for it, and an item whose lease ran out
    # meanwhile is handed out again at once when Redis answers).
    lease: float = LEASE
    namespace: str = field(default_factory=lambda: f"flt{uuid.uuid4().hex[:8]}")
    workers: list[W.WorkerProcess] = field(default_factory=list)
    published: dict[str, Published] = field(default_factory=dict)
    restarted: list[str] = field(default_factory=list)  # workers that exited, restarted

    def __post_init__(self) -> None:
        self.client = redis.Redis.from_url(
            self.server.url, socket_timeout=CLIENT_TIMEOUT, socket_connect_timeout=CLIENT_TIMEOUT
        )
        self.records = redis.Redis.from_url(self.records_url)
        # RabbitMQ when it answers: a killed worker's unacknowledged messages come back at
        # once. (The Redis broker restores them after its visibility timeout, when a worker
        # polls with nothing to read or starts: Celery's business, not the limiter's.)
        self.broker = redis_broker_url(self.records_url)
        if amqp_unreachable_reason() is None:
            self.broker = AMQP_URL
        self.limiter = Limiter(self.client, namespace=self.namespace)
        self.celery_queue = f"flt-c-{self.namespace}"
        self.rq_queue = f"flt-r-{self.namespace}"
        self.key = f"flt:{self.namespace}:runs"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._app: Any = None
        self._started_workers = 0

    # -- set up ----------------------------------------------------------------------------
    def configure(self) -> None:
        self.limiter.set_limit("tenant:*", TENANT_LIMIT)

    def start_celery(self, count: int = 2) -> list[W.WorkerProcess]:
        self._started_workers += 1
        started = W.start_celery_workers(
            count=count, concurrency=2, broker=self.broker, redis_url=self.server.url,
            namespace=self.namespace, queue=self.celery_queue, record_key=self.key,
            mode="fair", logdir=self.workdir, record_url=self.records_url,
            settings={"lease": self.lease},
            # Redelivered within the scenario when a worker dies holding it unacknowledged.
            conf={"task_acks_late": self.acks_late,
                  "broker_transport_options": {"visibility_timeout": 10}},
            name=f"c{self._started_workers}-",
        )  # fmt: skip
        self.workers += started
        return started

    def start_rq(self, count: int = 2) -> list[W.WorkerProcess]:
        self._started_workers += 1
        started = W.start_rq_workers(
            count=count, redis_url=self.server.url, namespace=self.namespace,
            queue=self.rq_queue, ours=True, simple=True, logdir=self.workdir,
            record_url=self.records_url, env={"QUEUE_RATELIMIT_LEASE": str(self.lease)},
            name=f"r{self._started_workers}-",
        )  # fmt: skip
        self.workers += started
        return started

    def revive(self) -> list[str]:
        """Start a worker for each one that exited (what a supervisor does); their names."""
        dead = [w for w in self.workers if not w.alive()]
        for w in dead:
            self.workers.remove(w)
            self.restarted.append(w.name)
            if w.name.startswith("r"):
                self.start_rq(1)
            else:
                self.start_celery(1)
        return [w.name for w in dead]

    # -- producing ---------------------------------------------------------------------------
    def _producer_app(self) -> Any:
        if self._app is None:
            self._app = W.build_celery_app(
                mode="producer", broker=self.broker, redis_url=self.server.url,
                namespace=self.namespace, queue=self.celery_queue, record_key=self.key,
                record_url=self.records_url,
            )  # fmt: skip
        return self._app

    def publish(self, framework: str, tenant: str) -> str:
        """One job; its id. A producer error is kept with the job (it may exist anyway)."""
        job_id = f"{framework[0]}-{uuid.uuid4().hex}"
        entry = Published(framework, tenant, time.time())
        with self._lock:
            self.published[job_id] = entry
        try:
            if framework == "celery":
                task = self._producer_app().tasks["bench.record"]
                task.apply_async(
                    (tenant, "normal", self.job_seconds, True), rate_tenant=tenant, task_id=job_id
                )
            else:
                queue = Queue(
                    self.rq_queue, connection=self.client, rate_namespace=self.namespace,
                    rate_hints=False,
                )  # fmt: skip
                queue.enqueue(W.rq_record, self.key, tenant, "normal", self.job_seconds, True,
                              rate_tenant=tenant, job_id=job_id, result_ttl=60)  # fmt: skip
        except Exception as exc:  # the fault may refuse it: noted, judged at the end
            entry.refused = f"{type(exc).__name__}: {exc}"
        return job_id

    def start_producing(self, per_second: float = 27.0, rq_per_second: float | None = None) -> None:
        """Publish ``per_second`` jobs per framework (RQ: ``rq_per_second`` if given),
        round-robin over the tenants (a bit more than their limits take: a backlog forms,
        slowly), from a thread per framework (a fault that stalls one producer leaves the
        other going) until ``stop_producing``.

        Each framework has tenants of its own: one tenant's budget shared by two queues goes
        mostly to the queue whose workers ask first (docs/reliability.md, "Soak")."""

        def produce(framework: str) -> None:
            rate = rq_per_second if framework == "rq" and rq_per_second else per_second
            n = 0
            begun = time.monotonic()
            while not self._stop.is_set():
                self.publish(framework, f"{framework[0]}{TENANTS[n % len(TENANTS)]}")
                n += 1
                delay = begun + n / rate - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)

        self._stop.clear()
        self._threads = [
            threading.Thread(target=produce, args=(f,), name=f"produce-{f}", daemon=True)
            for f in ("celery", "rq")
        ]
        for thread in self._threads:
            thread.start()

    def stop_producing(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), "a producer is stuck"

    # -- observing --------------------------------------------------------------------------
    def now(self) -> float:
        """The records server's clock (the clock the runs are stamped with)."""
        return W.redis_now(self.records)

    def runs(self) -> list[W.Run]:
        """The runs that ended (recorded with their start and end)."""
        return W.read_runs(self.records, self.key)

    def starts(self) -> Counter[str]:
        """How often each job started (a job killed mid-run started, and did not end)."""
        return Counter(i.decode() for i in self.records.lrange(W.started_key(self.key), 0, -1))

    def wait(
        self,
        condition: Callable[[], Any],
        *,
        timeout: float,
        what: str,
        supervise: bool = False,
    ) -> Any:
        """Poll ``condition`` until truthy (exceptions count as not yet); fail with what
        ran and the workers' logs after ``timeout``. ``supervise``: restart exited workers
        meanwhile."""

        def check() -> Any:
            if supervise:
                self.revive()
            return condition()

        return wait_for(
            check,
            timeout=timeout,
            what=what,
            on_timeout=lambda: f"{self.progress()}\n{self.logs()}",
        )

    def progress(self) -> str:
        """Published, refused (and the first refusal) and run so far."""
        with self._lock:
            refusals = [p.refused for p in self.published.values() if p.refused]
            published = len(self.published)
        first = refusals[0] if refusals else "-"
        ran = set(self.starts())
        missing = [i for i, p in self.published.items() if not p.refused and i not in ran]
        return (
            f"{published} published, {len(refusals)} refused ({first}), {len(ran)} ran; "
            f"not run: {[self.whereabouts(i) for i in missing[:5]]}"
        )

    def whereabouts(self, job_id: str) -> str:
        """Where a job that has not run is, as far as Redis tells (for failure messages)."""
        try:
            keys = self.limiter.keys
            meta = self.client.hget(keys.meta, job_id)
            found = [f"meta={meta!r}"] if meta else []
            for item in self.client.hkeys(keys.meta):
                if item.decode().startswith(job_id + "."):
                    lease = self.client.zscore(keys.inflight, item)
                    found.append(f"parked as {item.decode()} (in flight until {lease})")
            if job_id.startswith("r-"):
                status = self.client.hget(f"rq:job:{job_id}", "status")
                found.append(f"rq status={status!r}")
                for key in (f"rq:queue:{self.rq_queue}", f"rq:queue:{self.rq_queue}:intermediate"):
                    if self.client.lpos(key, job_id) is not None:
                        found.append(f"in {key}")
            return f"{job_id}: {', '.join(found) or 'nowhere in Redis'}"
        except redis.RedisError as exc:
            return f"{job_id}: ({exc})"

    def ran_all(self, ids: set[str]) -> bool:
        """Whether every job of ``ids`` has started."""
        return ids <= set(self.starts())

    def held_by_rq(self, job_ids: set[str]) -> dict[str, str]:
        """Of the RQ jobs ``job_ids`` that never ran, those RQ's own bookkeeping holds, as it
        would without us: failed by RQ, or left started (its abandoned-job handling), when a
        fault cut the job's start short; or ``intermediate``: left on RQ's intermediate list
        when the reply of the move onto it was lost (RQ's maintenance fails such a job as
        "stuck in intermediate queue", every 10 minutes; stock RQ moves jobs the same way).
        Id -> how it is held."""
        intermediate = {
            i.decode() for i in self.client.lrange(f"rq:queue:{self.rq_queue}:intermediate", 0, -1)
        }
        held = {}
        for job_id in sorted(job_ids):
            if not job_id.startswith("r-"):
                continue
            status = self.client.hget(f"rq:job:{job_id}", "status")
            if status in (b"failed", b"started"):
                held[job_id] = status.decode()
            elif status == b"queued" and job_id in intermediate:
                held[job_id] = "intermediate"
        return held

    def outcome(self) -> dict[str, Any]:
        """Every job published, against its runs: lost (never started), doubled (started
        twice), cut short (started, never ended: its worker was killed), refused at
        publishing, and (RQ) held by RQ's own bookkeeping after a fault cut its start short."""
        counts = self.starts()
        ended = {r.job_id for r in self.runs()}
        with self._lock:
            published = dict(self.published)
        accepted = {i for i, p in published.items() if not p.refused}
        refused = {i for i, p in published.items() if p.refused}
        by_framework: dict[str, Any] = {}
        for framework in ("celery", "rq"):
            mine = {i for i, p in published.items() if p.framework == framework}
            never = {i for i in mine & accepted if counts[i] == 0}
            held = self.held_by_rq(never)
            by_framework[framework] = {
                "published": len(mine & accepted),
                "lost": sorted(never - set(held)),
                "held_by_rq": dict(Counter(held.values())),
                "twice": {i: counts[i] for i in mine if counts[i] > 1},
                "cut_short": len([i for i in mine if counts[i] and i not in ended]),
                "refused": len(mine & refused),
                "refused_but_ran": len([i for i in mine & refused if counts[i] > 0]),
            }
        return by_framework

    def first_run_after(self, moment: float) -> dict[str, float | None]:
        """Seconds from ``moment`` (records clock) to the first run that started after it,
        per framework."""
        out: dict[str, float | None] = {}
        for framework in ("celery", "rq"):
            starts = [
                r.start
                for r in self.runs()
                if r.start > moment and r.job_id.startswith(framework[0] + "-")
            ]
            out[framework] = round(min(starts) - moment, 2) if starts else None
        return out

    def log_lines(self, *needles: str) -> dict[str, int]:
        """How many worker log lines contain each of ``needles``."""
        text = "\n".join(w.log.read_text(errors="replace") for w in self.workers)
        dead_logs = [p.read_text(errors="replace") for p in self.workdir.glob("*.log")]
        text = "\n".join(dead_logs) or text
        return {n: text.count(n) for n in needles}

    def logs(self) -> str:
        return "\n".join(f"----- {w.name} ({w.log})\n{w.tail()}" for w in self.workers)

    # -- tearing down ------------------------------------------------------------------------
    def close(self) -> None:
        self.stop_producing()
        for w in self.workers:
            w.kill()
        if self._app is not None:
            W.uninstall_producer(self._app)
        with contextlib.suppress(redis.RedisError):
            self.records.delete(
                self.key, W.started_key(self.key), W.celery_ready_key(self.namespace)
            )
        with contextlib.suppress(Exception):  # best effort: the queue may not exist
            if self.broker.startswith("amqp"):
                with Connection(self.broker, connect_timeout=3) as conn:
                    conn.default_channel.queue_delete(self.celery_queue)
            else:
                broker = redis.Redis.from_url(self.broker)
                broker.delete(self.celery_queue)
                broker.close()
        self.records.close()
        self.client.close()
