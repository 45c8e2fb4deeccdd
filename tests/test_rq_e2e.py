"""End to end with real RQ worker processes (three of them) fetching through the fair gate.

Workers are started the way users start them (``queue-ratelimit rq worker ...`` or
``rq worker -w queue_ratelimit.rq.SimpleWorker ...``), each in its own process group; the
job functions (``rq_e2e_jobs``) record every execution in Redis with Redis's clock, and the
assertions are made on those records. Worker logs are attached to the report of a failed test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import rq
from click.testing import CliRunner
from conftest import REDIS_SERVER, RedisProcess, wait_until
from e2e_support import HANDOFF, GroupProcess, assert_cap, report_logs_on_failure
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from queue_ratelimit import Limit, Limiter, RateLimited
from queue_ratelimit._counters import flush_counters
from queue_ratelimit.cli import main as cli_main
from queue_ratelimit.rq import Queue

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
JOB = "rq_e2e_jobs.record"


@dataclass
class Run:
    """One recorded execution."""

    job_id: str
    tenant: str
    at: float  # Redis TIME, seconds


class WorkerProcess(GroupProcess):
    """One RQ worker process, in a process group of its own (a forking worker's children too)."""


@dataclass
class RQEnv:
    """One test's queue, namespace, workers and records.

    Attributes:
        redis_url: the Redis the jobs, queues and limits live on.
        record_url: where executions are recorded (never restarted).
    """

    redis_url: str
    record_url: str
    workdir: Path
    namespace: str = field(default_factory=lambda: f"rq{uuid.uuid4().hex[:10]}")
    workers: list[WorkerProcess] = field(default_factory=list)
    supervise: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.conn = redis.Redis.from_url(self.redis_url)
        self.records = redis.Redis.from_url(self.record_url)
        self.limiter = Limiter(self.conn, namespace=self.namespace)
        self.queue_name = f"q-{self.namespace}"
        self.key = f"qrl-e2e:rq:{self.namespace}:ran"

    # -- producing -----------------------------------------------------------------------
    def queue(self, **options: Any) -> Queue:
        return Queue(
            self.queue_name, connection=self.conn, rate_namespace=self.namespace, **options
        )

    def plain_queue(self) -> rq.Queue:
        return rq.Queue(self.queue_name, connection=self.conn)

    def enqueue(self, tenant: str, count: int = 1, **options: Any) -> list[Job]:
        queue = self.queue()
        return [queue.enqueue(JOB, self.key, rate_tenant=tenant, **options) for _ in range(count)]

    # -- workers -------------------------------------------------------------------------
    def start_worker(
        self,
        name: str,
        *,
        simple: bool = True,
        burst: bool = False,
        via: str = "queue-ratelimit",
        extra: tuple[str, ...] = (),
    ) -> WorkerProcess:
        """Start a worker on this test's queue; returns at once (see ``wait_ready``)."""
        name = f"{self.namespace}-{name}"
        common = [self.queue_name, "--url", self.redis_url, "--name", name, *extra]
        if burst:
            common.append("--burst")
        if via == "queue-ratelimit":
            args = [str(BIN / "queue-ratelimit"), "--namespace", self.namespace, "rq", "worker"]
            args += ["--simple", *common] if simple else common
        else:
            worker = "SimpleWorker" if simple else "Worker"
            args = [str(BIN / "rq"), "worker", "-w", f"queue_ratelimit.rq.{worker}", *common]
        env = dict(os.environ)
        env.update(
            QRL_E2E_RECORD=self.record_url,
            QUEUE_RATELIMIT_NAMESPACE=self.namespace,
            # The job functions; the package comes from the environment (tox: the wheel).
            PYTHONPATH=os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p),
        )
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                args,
                cwd=TESTS_DIR,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(name, proc, log)
        self.workers.append(worker)
        return worker

    def wait_ready(self, *workers: WorkerProcess, timeout: float = 30.0) -> None:
        """Wait until every worker has registered itself with RQ."""

        def ready() -> bool:
            for w in workers:
                if not w.alive():
                    pytest.fail(f"worker {w.name} exited with {w.proc.returncode}\n{w.tail()}")
            return all(self.conn.exists(f"rq:worker:{w.name}") for w in workers)

        self.wait(ready, timeout=timeout, what="workers registered")

    def start_workers(self, count: int = 3, **options: Any) -> list[WorkerProcess]:
        started = [self.start_worker(f"w{i}", **options) for i in range(count)]
        self.wait_ready(*started)
        return started

    # -- observing -----------------------------------------------------------------------
    def wait(
        self, condition: Callable[[], object], *, timeout: float, what: str | Callable[[], str]
    ) -> Any:
        """``wait_until``, failing with the workers' logs; ``what`` may be computed late.

        ``supervise`` (when set) runs before each check, e.g. to restart exited workers.
        """

        def check() -> object:
            if self.supervise is not None:
                self.supervise()
            return condition()

        try:
            return wait_until(check, timeout=timeout, what="the condition")
        except pytest.fail.Exception as exc:
            said = what() if callable(what) else what
            raise AssertionError(f"{exc} ({said})\n{self.logs()}") from None

    def runs(self) -> list[Run]:
        rows = []
        for raw in self.records.lrange(self.key, 0, -1):
            job_id, tenant, at = raw.decode().split()
            rows.append(Run(job_id, tenant, float(at)))
        return rows

    def wait_runs(self, count: int, *, timeout: float) -> list[Run]:
        self.wait(
            lambda: self.records.llen(self.key) >= count,
            timeout=timeout,
            what=lambda: f"{count} recorded executions (have {self.records.llen(self.key)})",
        )
        return self.runs()

    def redis_now(self) -> float:
        seconds, micros = self.records.time()
        return seconds + micros / 1e6

    def backlog(self) -> int:
        return self.queue().rate_backlog

    def waiting(self) -> int:
        """Jobs of the queue not yet taken by a worker: RQ's list plus the fair backlog."""
        return self.conn.llen(f"rq:queue:{self.queue_name}") + self.backlog()

    def intermediate(self) -> list[str]:
        key = self.queue().intermediate_queue_key
        return [i.decode() for i in self.conn.lrange(key, 0, -1)]

    def statuses(self, job_ids: list[str]) -> dict[str, str | None]:
        jobs = Job.fetch_many(job_ids, connection=self.conn)
        return {
            i: (None if j is None else JobStatus(j.get_status(refresh=False)).value)
            for i, j in zip(job_ids, jobs, strict=True)
        }

    def admitted(self, tenant: str) -> int:
        """Admissions counted by the limiter for a tenant (each gated execution is one)."""
        flush_counters(self.limiter)
        return int(float(self.conn.hget(self.limiter.keys.tenant(tenant), "n:a") or 0))

    def logs(self) -> str:
        return "\n".join(f"----- {w.name} ({w.log}) -----\n{w.tail()}" for w in self.workers)

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        for client in (self.conn, self.records):
            try:
                keys = list(client.scan_iter(match=f"*{self.namespace}*", count=1000))
                if keys:
                    client.delete(*keys)
            except redis.RedisError:
                pass
            client.close()


@pytest.fixture
def env(redis_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RQEnv]:
    report_logs_on_failure(request.config, "env", "rq worker logs")
    e = RQEnv(redis_url=redis_url, record_url=redis_url, workdir=tmp_path)
    try:
        yield e
    finally:
        e.close()


def assert_exactly_once(runs: list[Run], job_ids: list[str]) -> None:
    counts = Counter(r.job_id for r in runs)
    twice = {i: n for i, n in counts.items() if n > 1}
    assert not twice, f"jobs run more than once: {twice}"
    missing = set(job_ids) - set(counts)
    assert not missing, f"{len(missing)} jobs never ran: {sorted(missing)[:5]}..."
    assert len(counts) == len(job_ids), "runs of jobs nobody enqueued"


# -- caps, weights, isolation ---------------------------------------------------------------
def test_caps_hold_across_workers(env: RQEnv) -> None:
    env.limiter.set_limit("global", Limit(40, burst=4))
    env.limiter.set_limit("tenant:*", Limit(15, burst=3))
    env.limiter.set_limit("tenant:slow", Limit(5, burst=2))
    # Half the jobs wait on RQ's list before any worker runs (the gate parks them), half
    # are routed into the fair backlog while the workers are busy; some come through a
    # plain rq.Queue and are gated by the worker all the same.
    jobs = [j for t in ("a", "b", "c") for j in env.enqueue(t, 25)] + env.enqueue("slow", 12)
    env.start_workers(3)
    plain = env.plain_queue()
    jobs += [j for t in ("a", "b", "c") for j in env.enqueue(t, 20)] + env.enqueue("slow", 12)
    jobs += [plain.enqueue(JOB, env.key, meta={"rate_tenant": "a"}) for _ in range(5)]

    runs = env.wait_runs(len(jobs), timeout=40)
    assert_exactly_once(runs, [j.id for j in jobs])
    assert_cap([r.at for r in runs], 40, 4, "global")
    for tenant, (rate, burst) in {"a": (15, 3), "b": (15, 3), "c": (15, 3), "slow": (5, 2)}.items():
        assert_cap([r.at for r in runs if r.tenant == tenant], rate, burst, f"tenant {tenant}")
    env.wait(lambda: env.waiting() == 0, timeout=5, what="nothing left waiting")


def contended_share(
    runs: list[Run], classify: Callable[[Run], str], first: str, second: str
) -> float:
    """Runs of class ``first`` per run of ``second`` while both had work (until ``first``
    ran out).

    The first runs are left out: jobs that reached RQ's plain list before the lane was
    contended pass the gate in arrival order until the budget is spent.
    """
    ordered = sorted(runs, key=lambda r: r.at)[10:]
    end = max(r.at for r in ordered if classify(r) == first)
    window = [classify(r) for r in ordered if r.at <= end]
    a, b = window.count(first), window.count(second)
    assert b > 0, f"{second} never ran while {first} was backlogged"
    return a / b


def test_priority_weights_hold_under_contention(env: RQEnv) -> None:
    env.limiter.set_limit("global", Limit(40, burst=1))
    env.start_workers(3)
    queue = env.queue()
    high: list[Job] = []
    low: list[Job] = []
    for i in range(90):
        high.append(queue.enqueue(JOB, env.key, rate_tenant="acme", rate_priority="high"))
        if i < 45:
            low.append(queue.enqueue(JOB, env.key, rate_tenant="acme", rate_priority="low"))
    runs = env.wait_runs(len(high) + len(low), timeout=30)
    assert_exactly_once(runs, [j.id for j in high + low])
    high_ids = {j.id for j in high}
    share = contended_share(
        runs, lambda r: "high" if r.job_id in high_ids else "low", "high", "low"
    )
    assert 2.2 <= share <= 4.0, f"high:low = {share:.2f} under contention, expected about 3"


def test_tenant_weights_hold_under_contention(env: RQEnv) -> None:
    env.limiter.set_limit("global", Limit(40, burst=1))
    scheduler = env.queue().rate_scheduler
    scheduler.set_tenant_weight("heavy", 5)
    scheduler.set_tenant_weight("light", 1)
    env.start_workers(3)
    queue = env.queue()
    jobs = []
    for i in range(100):
        jobs.append(queue.enqueue(JOB, env.key, rate_tenant="heavy"))
        if i < 30:
            jobs.append(queue.enqueue(JOB, env.key, rate_tenant="light"))
    runs = env.wait_runs(len(jobs), timeout=30)
    assert_exactly_once(runs, [j.id for j in jobs])
    share = contended_share(runs, lambda r: r.tenant, "heavy", "light")
    assert 3.5 <= share <= 7.0, f"heavy:light = {share:.2f} under contention, expected about 5"


def test_flooding_tenant_does_not_delay_a_quiet_one(env: RQEnv) -> None:
    env.limiter.set_limit("global", Limit(30, burst=3))
    env.limiter.set_limit("tenant:quiet", Limit(4, burst=1))
    env.start_workers(3)
    flood = env.enqueue("noisy", 300)
    env.wait(lambda: env.backlog() > 100, timeout=10, what="the flood backlogged")
    env.wait_runs(20, timeout=10)
    latencies = []
    for _ in range(6):
        enqueued_at = env.redis_now()
        (job,) = env.enqueue("quiet")
        done = env.wait(
            lambda job=job: [r for r in env.runs() if r.job_id == job.id],
            timeout=10,
            what="the quiet tenant's job",
        )
        latencies.append(done[0].at - enqueued_at)
        # Well inside the quiet tenant's own limit (4/s): only the flood could delay it.
        ran_at = done[0].at
        env.wait(
            lambda ran_at=ran_at: env.redis_now() - ran_at >= 0.3, timeout=5, what="0.3 s to pass"
        )
    noisy_runs = sum(1 for r in env.runs() if r.tenant == "noisy")
    assert noisy_runs < len(flood), "the flood was no longer backlogged: nothing was shown"
    assert max(latencies) < 2.0, f"quiet jobs waited {latencies} s behind the flood"


@pytest.mark.parametrize(
    ("backlog_first", "producer"),
    [(True, "ours"), (False, "ours"), (True, "plain")],
    ids=["backlog-first", "workers-first", "plain-rq-queue"],
)
def test_busy_workers_serve_a_quiet_tenant_before_a_noisy_backlog(
    env: RQEnv, backlog_first: bool, producer: str
) -> None:
    """No limit binds: the workers are the bottleneck. A noisy tenant's backlog, formed
    before or after the workers started, through our queue or a plain ``rq.Queue``, does
    not hold back a quiet tenant's jobs."""
    env.limiter.set_limit("global", Limit(100_000, burst=100_000))  # never binds
    queue = env.queue() if producer == "ours" else env.plain_queue()

    def enqueue(tenant: str) -> Job:
        if producer == "ours":
            return queue.enqueue(JOB, env.key, sleep=0.005, rate_tenant=tenant)
        return queue.enqueue(JOB, env.key, sleep=0.005, meta={"rate_tenant": tenant})

    if not backlog_first:
        env.start_workers(2)
    # More than two of the workers' bulk moves (ADOPT_BATCH): the quiet jobs sit further
    # down RQ's list than a worker reads at once.
    noisy = [enqueue("noisy") for _ in range(450)]
    quiet = {enqueue("quiet").id for _ in range(10)}
    enqueued_at = env.redis_now()
    if backlog_first:
        env.start_workers(2)

    runs = env.wait_runs(460, timeout=90)
    assert_exactly_once(runs, [j.id for j in noisy] + sorted(quiet))
    last_quiet = max(r.at for r in runs if r.job_id in quiet)
    # Noisy jobs that started after the quiet ones were enqueued, yet before the last of
    # them: FIFO runs every noisy job still waiting first; fair order a handful.
    ahead = sum(1 for r in runs if r.job_id not in quiet and enqueued_at < r.at < last_quiet)
    waiting = sum(1 for r in runs if r.job_id not in quiet and r.at > enqueued_at)
    assert ahead < 40, f"{ahead} of the {waiting} noisy jobs still waiting ran first"


def test_priorities_hold_for_a_backlog_formed_before_the_workers(env: RQEnv) -> None:
    """Jobs that reached RQ's list before any contention existed join the fair order."""
    env.limiter.set_limit("global", Limit(10, burst=2))
    high_ids = set()
    queue = env.queue()
    for _ in range(60):
        high_ids.add(queue.enqueue(JOB, env.key, rate_tenant="acme", rate_priority="high").id)
        queue.enqueue(JOB, env.key, rate_tenant="acme", rate_priority="low")
    env.start_workers(2)
    runs = env.wait_runs(120, timeout=30)
    first = ["high" if r.job_id in high_ids else "low" for r in runs[:48]]
    ratio = first.count("high") / max(1, first.count("low"))
    assert 2.85 <= ratio <= 3.15, f"high:low = {ratio:.2f} in the first 48 jobs, expected 3"


@pytest.mark.parametrize("simple", [True, False], ids=["SimpleWorker", "Worker"])
def test_a_concurrency_cap_holds_across_workers_and_holds_back_no_other_tenant(
    env: RQEnv, simple: bool
) -> None:
    env.limiter.set_concurrency("tenant:capped", 2)
    queue = env.queue()
    capped = [queue.enqueue(JOB, env.key, sleep=0.3, rate_tenant="capped") for _ in range(8)]
    free = [queue.enqueue(JOB, env.key, sleep=0.3, rate_tenant="free") for _ in range(4)]
    env.start_workers(3, simple=simple)
    env.wait(lambda: env.records.llen(f"{env.key}:end") >= 12, timeout=40, what="all 12 ended")
    starts = {r.job_id: r.at for r in env.runs()}
    ends = {}
    for raw in env.records.lrange(f"{env.key}:end", 0, -1):
        job_id, _tenant, at = raw.decode().split()
        ends[job_id] = float(at)
    spans = [(starts[j.id], ends[j.id]) for j in capped]
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    assert most == 2, f"{most} capped jobs ran at once under a cap of 2"
    span = max(b for _, b in spans) - min(a for a, _ in spans)
    assert span < 8 * 0.3 / 2 * 1.6, f"the cap of 2 was under-used: {span:.2f}s"
    assert max(ends[j.id] for j in free) < max(b for _, b in spans), "free tenant held back"
    # Every slot given back as its job ended (the worker gives it back just after the job
    # records its end), none left to run out.
    env.wait(
        lambda: env.limiter.running("tenant:capped") == 0,
        timeout=5,
        what="every slot given back",
    )


def test_a_killed_workers_concurrency_slot_comes_back_within_its_lease(env: RQEnv) -> None:
    env.limiter.set_concurrency("tenant:capped", 1)
    victim = env.start_worker("victim", extra=("--lease", "3"))
    env.wait_ready(victim)
    (slow,) = env.enqueue("capped", sleep=60)
    env.wait_runs(1, timeout=15)
    assert env.limiter.running("tenant:capped") == 1
    # The next worker is up before the kill: only the slot's lease is measured.
    env.wait_ready(env.start_worker("next", extra=("--lease", "3")))
    victim.kill()
    killed_at = env.redis_now()
    (nxt,) = env.enqueue("capped")
    runs = env.wait(
        lambda: [r for r in env.runs() if r.job_id == nxt.id], timeout=20, what="the next job"
    )
    assert runs[0].at - killed_at < 3 + 2, "the dead worker's slot came back with its lease"
    assert [r.job_id for r in env.runs()].count(slow.id) == 1


# -- the RQ API keeps working, and everything is gated --------------------------------------
def test_rate_options_of_any_type_in_job_meta_run_each_job_once(env: RQEnv) -> None:
    """Other code may put anything in ``job.meta`` (pickled: any object at all). Each job
    runs once, with the defaults where an option is malformed, whether the worker gates it
    off RQ's list, adopts it into the backlog or pushes it again for a retry; no worker
    dies."""
    from rq_e2e_jobs import Unreadable

    env.limiter.set_limit("tenant:*", Limit(50, burst=5))  # binding: work is parked
    nasty: list[Any] = [[1], {"x": 1}, float("nan"), 2**1100, "x" * 100_000, "", 0, -1]
    nasty += [True, "tenant:*", "a b", "HIGH", Unreadable()]
    plain = env.plain_queue()
    jobs: list[Job] = []
    # Enqueued before any worker runs: a long list of several tenants, which workers adopt
    # into the fair backlog (reading every job's meta), interleaved with good work.
    for i, value in enumerate(nasty):
        for option in ("rate_tenant", "rate_priority", "rate_cost"):
            jobs.append(plain.enqueue(JOB, env.key, meta={option: value}))
        jobs.append(plain.enqueue(JOB, env.key, meta={"rate_tenant": f"good{i % 3}"}))
    retried = plain.enqueue(
        JOB, env.key, fail_times=1, retry=rq.Retry(max=1), meta={"rate_cost": [1]}
    )
    env.start_workers(2)
    runs = env.wait_runs(len(jobs) + 2, timeout=60)
    env.wait(
        lambda: set(env.statuses([j.id for j in [*jobs, retried]]).values()) == {"finished"},
        timeout=20,
        what="every job finished",
    )
    counts = Counter(r.job_id for r in env.runs())
    assert counts == {**{j.id: 1 for j in jobs}, retried.id: 2}, runs
    assert all(w.alive() for w in env.workers)
    assert "bad rate options" in "".join(w.log.read_text() for w in env.workers)


def test_every_way_of_enqueueing_runs_gated_and_options_never_reach_the_function(
    env: RQEnv,
) -> None:
    env.limiter.set_limit("tenant:*", Limit(20, burst=2))
    # One worker runs RQ's scheduler (enqueue_at/in, retries with an interval); one is
    # started through `rq worker -w`, which builds plain rq.Queue objects.
    env.wait_ready(
        env.start_worker("sched", extra=("--with-scheduler",)),
        env.start_worker("rqcli", via="rq"),
        env.start_worker("w2"),
    )
    queue = env.queue()
    key = env.key
    expected: dict[str, tuple[str, int]] = {}  # job id -> (tenant, executions)

    def expect(jobs: list[Job] | Job, tenant: str, runs: int = 1) -> None:
        for job in jobs if isinstance(jobs, list) else [jobs]:
            expected[job.id] = (tenant, runs)

    for _ in range(3):
        expect(
            queue.enqueue(JOB, key, 1, x=1, rate_tenant="t-enq", rate_priority="high",
                          rate_cost=1),
            "t-enq",
        )  # fmt: skip
        expect(
            queue.enqueue_call(func=JOB, args=(key, 2), kwargs={"y": 2}, rate_tenant="t-call"),
            "t-call",
        )
        expect(env.plain_queue().enqueue(JOB, key, meta={"rate_tenant": "t-plain"}), "t-plain")
    many = queue.enqueue_many(
        [Queue.prepare_data(JOB, args=(key, i), meta={"rate_tenant": "t-many"}) for i in range(3)]
    )
    expect(many, "t-many")
    expect(queue.enqueue_in(timedelta(seconds=1), JOB, key, rate_tenant="t-in"), "t-in")
    when = datetime.now(UTC) + timedelta(seconds=1)
    expect(queue.enqueue_at(when, JOB, key, rate_tenant="t-at"), "t-at")
    parent = queue.enqueue(JOB, key, sleep=0.3, rate_tenant="t-parent")
    expect(parent, "t-parent")
    expect(queue.enqueue(JOB, key, depends_on=parent, rate_tenant="t-child"), "t-child")
    expect(
        queue.enqueue(JOB, key, fail_times=2, retry=rq.Retry(max=2), rate_tenant="t-retry"),
        "t-retry",
        runs=3,
    )
    expect(
        queue.enqueue(JOB, key, fail_times=1, retry=rq.Retry(max=1, interval=1),
                      rate_tenant="t-later"),
        "t-later",
        runs=2,
    )  # fmt: skip

    total = sum(n for _, n in expected.values())
    runs = env.wait_runs(total, timeout=40)
    unfinished: dict[str, str | None] = {}

    def all_finished() -> bool:
        unfinished.clear()
        unfinished.update(
            (i, s) for i, s in env.statuses(list(expected)).items() if s != "finished"
        )
        return not unfinished

    env.wait(all_finished, timeout=15, what=lambda: f"every job finished; not yet: {unfinished}")
    counts = Counter(r.job_id for r in runs)
    assert counts == Counter({i: n for i, (_, n) in expected.items()})
    for r in runs:
        assert r.tenant == expected[r.job_id][0], f"job {r.job_id} ran as tenant {r.tenant}"
    # Every execution (retries too) passed the limiter exactly once.
    per_tenant = Counter()
    for tenant, n in expected.values():
        per_tenant[tenant] += n
    for tenant, n in per_tenant.items():
        assert env.admitted(tenant) == n, f"tenant {tenant}: {env.admitted(tenant)} admissions"
    for tenant in per_tenant:
        assert_cap([r.at for r in runs if r.tenant == tenant], 20, 2, f"tenant {tenant}")
    assert env.waiting() == 0
    assert env.intermediate() == []


# -- nothing lost, nothing run twice ---------------------------------------------------------
def settle(
    env: RQEnv,
    job_ids: list[str],
    *,
    allowed_unfinished: int,
    timeout: float,
) -> None:
    """Wait until every job finished except at most ``allowed_unfinished`` (the ones dead
    workers held), then check nothing ran twice, nothing is lost and nothing waits.
    """

    def done() -> bool:
        statuses = env.statuses(job_ids)
        unfinished = [i for i, s in statuses.items() if s != "finished"]
        return len(unfinished) <= allowed_unfinished and env.waiting() == 0

    def state() -> str:
        unfinished = Counter(s for s in env.statuses(job_ids).values() if s != "finished")
        alive = sum(w.alive() for w in env.workers)
        return (
            f"the workers to drain the queue: unfinished {dict(unfinished)} (may be "
            f"{allowed_unfinished}), on RQ's list {env.conn.llen(f'rq:queue:{env.queue_name}')}, "
            f"in the backlog {env.backlog()}, intermediate {len(env.intermediate())}, "
            f"workers alive {alive} of {len(env.workers)}"
        )

    env.wait(done, timeout=timeout, what=state)
    runs = env.runs()
    counts = Counter(r.job_id for r in runs)
    twice = {i: n for i, n in counts.items() if n > 1}
    assert not twice, f"jobs run more than once: {twice}"
    statuses = env.statuses(job_ids)
    started = set(StartedJobRegistry(env.queue_name, connection=env.conn).get_job_ids())
    intermediate = set(env.intermediate())
    for job_id, status in statuses.items():
        if status == "finished":
            assert counts[job_id] == 1, f"finished job {job_id} has {counts[job_id]} runs"
            continue
        # A job a dead worker held: RQ's own abandoned-job handling owns it (it started, or
        # sits in the intermediate list if the worker died between taking and starting it).
        # Or one RQ failed because Redis went away while it started or finished it.
        assert counts[job_id] <= 1
        held = status == "started" or job_id in started or job_id in intermediate
        if status == "failed":
            result = Job.fetch(job_id, connection=env.conn).latest_result()
            text = (result.exc_string or "") if result is not None else ""
            held = any(e in text for e in ("ConnectionError", "BusyLoadingError", "TimeoutError"))
        assert held, f"job {job_id} is {status}: neither finished nor held by RQ's bookkeeping"


def test_exactly_once_across_sigkill_of_a_forking_worker(env: RQEnv) -> None:
    env.limiter.set_limit("global", Limit(50, burst=5))
    workers = env.start_workers(3, simple=False)
    jobs = [j for t in ("a", "b", "c") for j in env.enqueue(t, 40, sleep=0.05)]
    env.wait_runs(40, timeout=20)
    workers[0].kill()  # the worker and the work horse it forked, mid-run
    settle(env, [j.id for j in jobs], allowed_unfinished=1, timeout=40)
    assert all(w.alive() for w in workers[1:])


def test_exactly_once_across_a_warm_shutdown(env: RQEnv) -> None:
    env.limiter.set_limit("global", Limit(50, burst=5))
    workers = env.start_workers(3)
    jobs = [j for t in ("a", "b", "c") for j in env.enqueue(t, 40, sleep=0.05)]
    env.wait_runs(30, timeout=20)
    workers[0].proc.send_signal(signal.SIGTERM)
    assert workers[0].proc.wait(timeout=15) == 0, workers[0].tail()
    settle(env, [j.id for j in jobs], allowed_unfinished=0, timeout=40)
    assert env.intermediate() == []


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_exactly_once_across_redis_restarts(
    redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = RedisProcess(
        tmp_path / "redis", extra=["--appendonly", "yes", "--appendfsync", "always"]
    ).start()
    # Jobs live on the server that restarts; executions are recorded on the suite's server.
    env = RQEnv(redis_url=server.url, record_url=redis_url, workdir=tmp_path)
    request.node.funcargs["env"] = env  # worker logs on failure
    restarted: list[WorkerProcess] = []

    def crash_and_restart() -> None:
        server.stop()  # SIGKILL: a crash, with every acknowledged write in the AOF
        server.start()
        env.conn.connection_pool.disconnect()

    def revive() -> None:
        # A worker that loses Redis outside its dequeue (starting, running or finishing a
        # job) exits: that is RQ's own behaviour, and the job it held is RQ's to handle as
        # abandoned. Its supervisor (systemd, Kubernetes) starts another.
        for w in list(env.workers):
            if not w.alive() and w not in restarted:
                restarted.append(w)
                env.start_worker(f"{w.name.rsplit('-', 1)[1]}r{len(restarted)}")

    env.supervise = revive
    try:
        env.limiter.set_limit("tenant:*", Limit(30, burst=3))
        env.start_workers(3)
        jobs = [j for t in ("a", "b", "c") for j in env.enqueue(t, 40, sleep=0.01)]
        ids = [j.id for j in jobs]
        env.wait_runs(20, timeout=20)

        # 1. Redis crashes while the workers run jobs.
        crash_and_restart()
        env.wait_runs(60, timeout=30)  # the workers (or their replacements) carry on

        # 2. Redis crashes while every worker waits in the gate for parked jobs: all of
        # them reconnect by themselves.
        env.limiter.set_limit("tenant:*", Limit(1, per=60, burst=1))
        started = StartedJobRegistry(env.queue_name, connection=env.conn)

        def all_idle() -> bool:
            alive = {w.name for w in env.workers if w.alive()}
            states = {env.conn.hget(f"rq:worker:{name}", "state") for name in alive}
            held = Job.fetch_many(started.get_job_ids(), connection=env.conn)
            busy = [j for j in held if j is not None and j.worker_name in alive]
            # ... and none has run a job for a while: it is back in the gate, not between jobs.
            quiet = env.redis_now() - max(r.at for r in env.runs()) > 1.0
            return len(alive) == 3 and states == {b"idle"} and not busy and quiet

        env.wait(all_idle, timeout=20, what="every worker idle in the gate")
        waiting_workers = [w for w in env.workers if w.alive()]
        crash_and_restart()
        env.limiter.set_limit("tenant:*", Limit(30, burst=3))
        # Each of the three workers running jobs when Redis crashed may have had one that
        # RQ could not finish; the second crash found them all waiting.
        settle(env, ids, allowed_unfinished=3, timeout=60)
        assert all(w.alive() for w in waiting_workers), "a waiting worker did not reconnect"
    finally:
        env.close()
        server.stop()


# -- worker flags ------------------------------------------------------------------------------
def test_burst_waits_for_parked_jobs_instead_of_exiting(env: RQEnv) -> None:
    env.limiter.set_limit("tenant:*", Limit(8, burst=2))
    jobs = env.enqueue("a", 10)
    jobs += [env.plain_queue().enqueue(JOB, env.key, meta={"rate_tenant": "a"}) for _ in range(6)]
    worker = env.start_worker("burst", burst=True)
    assert worker.proc.wait(timeout=30) == 0, worker.tail()
    runs = env.runs()
    assert_exactly_once(runs, [j.id for j in jobs])
    span = max(r.at for r in runs) - min(r.at for r in runs)
    assert span >= (16 - 2) / 8 - HANDOFF, f"16 jobs at 8/s burst 2 ran within {span:.2f} s"
    assert env.waiting() == 0


def script_calls(client: redis.Redis) -> int:
    """Calls of our scripts so far (FCALL with Redis Functions, EVALSHA without)."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "fcall"))


def test_idle_workers_do_not_busy_loop(env: RQEnv) -> None:
    env.limiter.set_limit("tenant:slow", Limit(1, per=60, burst=1))
    workers = env.start_workers(3)
    jobs = env.enqueue("slow", 4)  # one runs now; three are parked for a minute
    env.wait_runs(1, timeout=10)
    env.wait(lambda: env.backlog() == 3, timeout=10, what="three jobs parked")
    before, started = script_calls(env.conn), time.monotonic()
    env.wait(lambda: time.monotonic() - started >= 2.0, timeout=5, what="2 s of idling")
    calls = script_calls(env.conn) - before
    assert calls < 100, f"3 idle workers made {calls} script calls in 2 s"
    (ran,) = env.runs()
    parked = [j.id for j in jobs if j.id != ran.job_id]
    assert env.statuses(parked) == dict.fromkeys(parked, "queued")
    # A waiting worker still answers a warm shutdown at once, and leaves the parked jobs be.
    for w in workers:
        w.proc.send_signal(signal.SIGTERM)
    for w in workers:
        assert w.proc.wait(timeout=5) == 0, w.tail()
    assert env.backlog() == 3
    assert env.intermediate() == []


def test_max_jobs_and_name(env: RQEnv) -> None:
    env.limiter.set_limit("tenant:*", Limit(50, burst=5))
    jobs = env.enqueue("a", 8)
    worker = env.start_worker("named", extra=("--max-jobs", "5"))
    assert worker.proc.wait(timeout=30) == 0, worker.tail()
    runs = env.runs()
    assert len(runs) == 5
    assert len({r.job_id for r in runs}) == 5
    ran = Job.fetch_many([r.job_id for r in runs], connection=env.conn)
    assert {j.worker_name for j in ran if j is not None} == {worker.name}
    assert env.waiting() == 3
    assert set(env.statuses([j.id for j in jobs]).values()) == {"finished", "queued"}


# -- producer side ----------------------------------------------------------------------------
def test_reject_policy_raises_and_enqueues_nothing(env: RQEnv) -> None:
    env.limiter.set_limit("tenant:acme", Limit(1, per=60, burst=1))
    strict = env.queue(rate_policy="reject")
    first = strict.enqueue(JOB, env.key, rate_tenant="acme")
    assert first.rate_hint.allowed
    assert first.rate_hint.wait_ms == 0
    assert env.limiter.acquire("acme", queue=env.queue_name).allowed  # spend the token
    with pytest.raises(RateLimited) as caught:
        strict.enqueue(JOB, env.key, rate_tenant="acme", job_id="refused-1")
    assert caught.value.wait_ms > 0
    assert caught.value.denied_by == "tenant:acme"
    assert not Job.exists("refused-1", connection=env.conn)
    assert env.waiting() == 1
    # The default policy enqueues and says how long the job will wait: behind the first
    # one, still on RQ's list, it needs the next two tokens.
    hinted = env.queue().enqueue(JOB, env.key, rate_tenant="acme")
    assert hinted.rate_hint.allowed is False
    assert hinted.rate_hint.backlog == 1
    assert 60_000 < hinted.rate_hint.wait_ms <= 120_000
    assert hinted.rate_hint.denied_by == "tenant:acme"
    assert env.waiting() == 2
    # Other tenants are not refused.
    assert strict.enqueue(JOB, env.key, rate_tenant="other").rate_hint.allowed


def test_hints_count_the_jobs_ahead_and_workers_take_them_off(env: RQEnv) -> None:
    """The issue's example at an hourly rate (nothing refills while the test runs): 90 jobs
    at once into ``tenant:*`` 10 per period, no worker. Each is told when it would start
    behind the ones before it, which wait on RQ's list; once a worker has run them all,
    none is counted ahead of the next job."""
    env.limiter.set_limit("tenant:*", Limit(10, per=3600, burst=10))
    jobs = env.enqueue("acme", 90)
    hints = [j.rate_hint for j in jobs]
    assert (hints[4].allowed, hints[4].wait_ms, hints[4].backlog) == (True, 0, 4)
    assert hints[89].backlog == 89
    assert hints[89].wait_ms == pytest.approx(80 * 360_000, rel=1e-3)

    env.limiter.set_limit("tenant:*", Limit(1000, burst=100))
    env.start_worker("w", burst=True)
    assert_exactly_once(env.wait_runs(90, timeout=60), [j.id for j in jobs])
    scheduler = env.queue().rate_scheduler
    assert scheduler.hint("acme", queue=env.queue_name).backlog == 0


@pytest.mark.parametrize("path", ["gate", "dispatch"])
def test_a_worker_says_at_info_what_it_holds_back(
    env: RQEnv, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A worker waiting for the budgets is not silent: a line per tenant per interval,
    naming the scope and window that bind, whether its gate parked the job for them
    (``gate``: the jobs wait on RQ's list, one tenant's) or the dispatch held the job
    back (``dispatch``: two tenants' jobs on the list, moved into the fair backlog first,
    where the limited tenant's meet their budget)."""
    monkeypatch.setenv("QUEUE_RATELIMIT_LOG_INTERVAL", "0.5")
    env.limiter.set_limit("tenant:acme", [Limit(100), Limit(1, per=3600, burst=1)])
    env.enqueue("acme", 4)
    if path == "dispatch":
        env.enqueue("other")
    worker = env.start_worker("w")
    env.wait_runs(2 if path == "dispatch" else 1, timeout=30)
    line = f"queue-ratelimit: throttled: tenant acme on {env.queue_name}: "

    def said() -> list[str]:
        return [x for x in worker.log.read_text(errors="replace").splitlines() if line in x]

    env.wait(lambda: any("(tenant:acme (1/h))" in x for x in said()), timeout=30,
             what="a throttling line naming the window")  # fmt: skip
    env.wait(lambda: said()[-1].endswith("3 waiting"), timeout=30, what="3 waiting")


# -- a lost reply strands nothing (in process, deterministic) ---------------------------------
class LosesAReply(redis.Redis):
    """A client that, once armed, runs a matching command and then fails as if the reply was
    lost (Redis restarted, the network dropped) - the command took effect all the same."""

    lose: Callable[[tuple[Any, ...]], bool] | None = None

    def execute_command(self, *args: Any, **options: Any) -> Any:
        result = super().execute_command(*args, **options)
        if self.lose is not None and self.lose(args):
            self.lose = None
            raise redis.ConnectionError("reply lost (test)")
        return result


def script_mode(args: tuple[Any, ...]) -> str | None:
    """The mode of a scheduler.lua call (its first argument after the keys)."""
    if args[0] not in ("EVALSHA", "FCALL") or len(args) < 4:
        return None
    at = 3 + int(args[2])  # command, script, number of keys, the keys, then the mode
    return args[at] if len(args) > at and isinstance(args[at], str) else None


def test_a_dispatch_whose_reply_is_lost_is_run_by_the_next_dequeue(env: RQEnv) -> None:
    client = LosesAReply.from_url(env.redis_url)
    queue = Queue(env.queue_name, connection=client, rate_namespace=env.namespace)
    job = queue.create_job(JOB, args=(env.key,), meta={"rate_tenant": "acme"})
    job.save()
    queue.rate_scheduler.submit("acme", job.id, queue=queue.name)  # parked in the backlog
    client.lose = lambda args: script_mode(args) == "dispatch"
    with pytest.raises(redis.ConnectionError):
        Queue.dequeue_any([queue], 1, connection=client)
    assert env.intermediate() == [job.id]  # handed over; the worker never saw it
    assert queue.rate_backlog == 0
    found = Queue.dequeue_any([queue], 1, connection=client)
    assert found is not None
    assert found[0].id == job.id
    assert env.admitted("acme") == 1  # its tokens were taken once
    client.close()


def test_a_gate_whose_reply_is_lost_gates_the_job_again(env: RQEnv) -> None:
    client = LosesAReply.from_url(env.redis_url)
    queue = Queue(env.queue_name, connection=client, rate_namespace=env.namespace)
    job = env.plain_queue().enqueue(JOB, env.key, meta={"rate_tenant": "acme"})
    gate = queue.rate_scheduler._scripts.functions["gate.lua"]
    client.lose = lambda args: args[0] == "FCALL" and args[1] == gate
    with pytest.raises(redis.ConnectionError):
        Queue.dequeue_any([queue], 1, connection=client)
    assert env.intermediate() == [job.id]
    found = Queue.dequeue_any([queue], 1, connection=client)
    assert found is not None
    assert found[0].id == job.id
    assert env.intermediate() == [job.id]  # RQ takes it off when the worker starts it
    client.close()


def test_rq_info_shows_running_and_parked_per_tenant(env: RQEnv) -> None:
    """`queue-ratelimit rq info` against real workers: a job running (RQ's started registry
    and its slot), one parked by a worker's gate (the cap), one routed into the backlog."""
    env.limiter.set_concurrency("tenant:capped", 1)
    env.start_workers(2)
    (running,) = env.enqueue("capped", sleep=60)
    env.wait_runs(1, timeout=15)
    env.enqueue("capped", sleep=60)  # a free worker takes it off RQ's list: its gate parks it
    env.wait(lambda: env.backlog() == 1, timeout=15, what="parked by the cap")
    env.enqueue("capped")  # the lane is contended now: routed into the backlog
    assert env.backlog() == 2
    result = CliRunner().invoke(
        cli_main,
        ["--url", env.redis_url, "--namespace", env.namespace, "rq", "info", "--json"],
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    (q,) = [q for q in shown["queues"] if q["queue"] == env.queue_name]
    assert (q["waiting"], q["parked"], q["running"]) == (0, 2, 1)
    assert q["tenants"] == {"capped": {"waiting": 0, "parked": 2, "running": 1}}
    assert q["held_back_by"] == {"capped": "tenant:capped"}  # (its cap: the running job)
    assert shown["slots"] == {"tenant:capped": {"cap": 1, "held": 1}}
    assert StartedJobRegistry(env.queue_name, connection=env.conn).get_job_ids() == [running.id]


# -- a sharded namespace (docs/design.md, "Shards") ------------------------------------------
def test_a_sharded_namespace_runs_every_job_once_under_its_caps(
    env: RQEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers and producers with QUEUE_RATELIMIT_SHARDS=3: each tenant's work on its
    shard, the global cap sliced between the shards (its bound: R*T + B + N)."""
    monkeypatch.setenv("QUEUE_RATELIMIT_SHARDS", "3")
    sharded = Limiter(env.conn, namespace=env.namespace, shards=3, rebalance_interval=0.25)
    sharded.set_limit("global", Limit(40, burst=4))
    sharded.set_limit("tenant:*", Limit(15, burst=3))
    tenants = [f"t{i}" for i in range(9)]
    assert {sharded.shard_of(t) for t in tenants} == {0, 1, 2}
    jobs = [j for t in tenants for j in env.enqueue(t, 10)]
    env.start_workers(3)
    jobs += [j for t in tenants for j in env.enqueue(t, 8)]

    runs = env.wait_runs(len(jobs), timeout=60)
    assert_exactly_once(runs, [j.id for j in jobs])
    assert_cap([r.at for r in runs], 40, 4 + 3, "global (sharded)")
    for tenant in tenants:
        assert_cap([r.at for r in runs if r.tenant == tenant], 15, 3, f"tenant {tenant}")
        shard = sharded.shard_keys[sharded.shard_of(tenant)]
        sharded.flush_counters()
        assert int(env.conn.hget(shard.tenant(tenant), "n:a") or 0) >= 1
    env.wait(lambda: env.queue().count == 0, timeout=5, what="nothing left waiting")
