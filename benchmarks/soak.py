"""Soak: patterned load through the limiter and real Celery and RQ workers for a long time.

``make soak`` (``tests/run_with_redis.sh python -m benchmarks soak``) prints one JSON object.
It runs for ``SOAK_SECONDS`` (default 600) and reports:

- nothing lost: every job published ran exactly once (each job records its run);
- cap adherence: for every tenant with a limit, the largest number of runs in any window of
  0.25 s to 60 s against ``rate * (window + HANDOFF) + burst`` (``HANDOFF``: a job is stamped
  when it starts, a moment after its admission); a violation is a window over its bound;
- smoothness: runs per second of the tenants kept saturated, against their rate (mean,
  standard deviation, min, max);
- memory of the limiter's Redis (``INFO memory``: ``used_memory`` and the Lua VM of Redis
  Functions, ``used_memory_vm_functions``) at the start, its peak, at the end of the load,
  once every key with an expiry has expired (``counter_retention`` and the Celery
  ``dedupe_window`` are shortened to ``SOAK_RETENTION``, default 10 s, so the run sees it),
  and after a full collection of the Lua VM (on Redis 7.0 freed Lua memory shows only after
  one: docs/reliability.md, "Numbers and memory").

The load, in one namespace, for the whole run (``R`` = ``SOAK_RATE``, default 10/s, each
patterned tenant's limit, burst ``SOAK_BURST``, default 5):

- ``steady``: offered at 1.2 R while less than 2 s of its work is outstanding, so its limit
  binds all the time and its backlog stays bounded;
- ``sine``: offered at R * (0.8 + 0.7 sin(2 pi t / 60 s)): above the limit at the crest;
- ``bursts``: 4 R for 5 s of every 30 s, nothing in between;
- ``shared``: one tenant fed by the Celery and the RQ producer at once, like ``steady``
  (one cap across both frameworks);
- one-off tenants: ``SOAK_ONEOFF`` (default 100,000) tenants never seen before, one job each,
  spread evenly over the run (under ``tenant:*``, 5/s: each is admitted at once).

Each pattern has a Celery tenant and an RQ tenant (``c-steady``, ``r-steady``...); three
in four one-off jobs go through Celery, whose workers take more per second. Workers:
``SOAK_CELERY_WORKERS`` (2) prefork Celery workers (``-c 2``, the gate installed, fair
capacity on) and ``SOAK_RQ_WORKERS`` (2) of our RQ ``SimpleWorker``. The global limit
(10,000/s) never binds; it is checked all the same.

Redis: the limiter (and RQ's jobs, which live with it) gets a ``redis-server`` of the soak's
own on a free loopback port, so its memory is the soak's alone. Job records and the Celery
broker (the next database) go to ``--redis-url`` / ``$REDIS_URL``.

Environment: ``SOAK_SECONDS``, ``SOAK_ONEOFF``, ``SOAK_RATE``, ``SOAK_BURST``,
``SOAK_RETENTION``, ``SOAK_CELERY_WORKERS``, ``SOAK_RQ_WORKERS``, ``SOAK_DRAIN_TIMEOUT``
(seconds to wait for the last jobs after the load, default 300), ``SOAK_SETTLE_TIMEOUT``
(seconds to wait for the expiries, default 120 plus 3 x the retention).
"""

from __future__ import annotations

import bisect
import math
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from queue_ratelimit import Limit, Limiter
from queue_ratelimit._counters import flush_counters

from . import _workers as W
from ._common import broker_url_for, env_float, env_int, log, machine_info, sig

# Executions are stamped when the job starts, a moment after the gate admitted it (the
# worker hands it to its pool, or saves it first): runs admitted within a window can show
# up spread over the window plus this much (the end-to-end tests allow the same).
HANDOFF = 0.1
WINDOWS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TICK = 0.05  # seconds between the producer's steps
SAMPLE_EVERY = 1.0  # seconds between memory samples
ONEOFF_LIMIT = Limit(5, burst=5)
GLOBAL_LIMIT = Limit(10_000, burst=1_000)
# The Lua VM's collector, run once at the end: a one-function library, deleted after.
GC_LIBRARY = "qrl_soak_gc"
GC_SOURCE = f"""#!lua name={GC_LIBRARY}
redis.register_function('{GC_LIBRARY}_collect', function(keys, args)
  collectgarbage('collect')
  return 1
end)"""


@dataclass(frozen=True)
class SoakSettings:
    """What one soak run does (see the module's docstring)."""

    seconds: float = 600.0
    oneoff: int = 100_000
    rate: float = 10.0
    burst: float = 5.0
    retention: float = 10.0
    celery_workers: int = 2
    celery_concurrency: int = 2
    rq_workers: int = 2
    sine_period: float = 60.0
    burst_period: float = 30.0
    burst_on: float = 5.0
    drain_timeout: float = 300.0
    settle_timeout: float | None = None

    @classmethod
    def from_env(cls) -> SoakSettings:
        d = cls()
        settle = os.environ.get("SOAK_SETTLE_TIMEOUT")
        return cls(
            seconds=env_float("SOAK_SECONDS", d.seconds),
            oneoff=env_int("SOAK_ONEOFF", d.oneoff),
            rate=env_float("SOAK_RATE", d.rate),
            burst=env_float("SOAK_BURST", d.burst),
            retention=env_float("SOAK_RETENTION", d.retention),
            celery_workers=env_int("SOAK_CELERY_WORKERS", d.celery_workers),
            rq_workers=env_int("SOAK_RQ_WORKERS", d.rq_workers),
            drain_timeout=env_float("SOAK_DRAIN_TIMEOUT", d.drain_timeout),
            settle_timeout=env_float("SOAK_SETTLE_TIMEOUT", 1.0) if settle else None,
        )

    @property
    def settle_deadline(self) -> float:
        return self.settle_timeout or 120 + 3 * self.retention


# -- load patterns -----------------------------------------------------------------------
@dataclass
class Stream:
    """One tenant's offered load from one producer: ``rate(t)`` jobs per second, and
    ``cap`` (jobs outstanding, i.e. published and not yet run) past which it holds back."""

    tenant: str
    framework: str  # "celery" or "rq"
    pattern: str
    rate: Callable[[float], float]
    cap: float | None = None
    due: float = 0.0  # jobs owed so far (fractional)
    published: int = 0


def streams(s: SoakSettings) -> list[Stream]:
    r = s.rate

    def steady(t: float) -> float:
        return 1.2 * r

    def sine(t: float) -> float:
        return r * (0.8 + 0.7 * math.sin(2 * math.pi * t / s.sine_period))

    def bursts(t: float) -> float:
        return 4 * r if t % s.burst_period < s.burst_on else 0.0

    def half_steady(t: float) -> float:
        return 0.6 * r

    out = []
    for framework, letter in (("celery", "c"), ("rq", "r")):
        out += [
            Stream(f"{letter}-steady", framework, "steady", steady, cap=2 * r),
            Stream(f"{letter}-sine", framework, "sine", sine),
            Stream(f"{letter}-bursts", framework, "bursts", bursts),
            Stream("x-shared", framework, "shared", half_steady, cap=r),
        ]
    return out


SATURATED = ("steady", "shared")


# -- a Redis server of the soak's own ----------------------------------------------------------
@contextmanager
def redis_server(workdir: Path, extra: list[str] | None = None) -> Iterator[str]:
    """A ``redis-server`` on a free loopback port for the duration; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the soak starts a redis-server of its own: install redis-server")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--logfile",
            str(workdir / "redis.log"), *(extra or [])]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        probe = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.02)
        probe.close()
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- measuring -----------------------------------------------------------------------------
# INFO memory fields sampled (Redis 7.0 names): the whole, the data, the connections, and
# the two Lua VMs (Functions: the library and its plan cache; EVAL: scripts and their cache).
MEMORY_FIELDS = {
    "used_memory": "used_memory",
    "dataset": "used_memory_dataset",
    "clients": "mem_clients_normal",
    "vm_functions": "used_memory_vm_functions",
    "vm_eval": "used_memory_vm_eval",
    "scripts_eval": "used_memory_scripts_eval",
}


def memory(client: redis.Redis) -> dict[str, int]:
    info = cast(dict[str, Any], client.info("memory"))
    keyspace = cast(dict[str, Any], client.info("keyspace")).get("db0") or {}
    return {
        **{name: int(info.get(field, 0)) for name, field in MEMORY_FIELDS.items()},
        "keys": int(keyspace.get("keys", 0)),
        "expiring_keys": int(keyspace.get("expires", 0)),
    }


def most_in_window(times: list[float], window: float) -> int:
    """The largest number of ``times`` (sorted) in any closed interval of length ``window``."""
    return max(
        (bisect.bisect_right(times, t + window, lo=i) - i for i, t in enumerate(times)),
        default=0,
    )


def cap_report(times: list[float], rate: float, burst: float) -> dict[str, Any]:
    """Most runs in each window length against the bound; the windows over it."""
    ordered = sorted(times)
    windows = {}
    violations = 0
    for window in WINDOWS:
        most = most_in_window(ordered, window)
        bound = rate * (window + HANDOFF) + burst
        violations += most > bound
        windows[f"{window:g}s"] = {"most": most, "bound": sig(bound)}
    return {"runs": len(ordered), "violations": violations, "windows": windows}


def per_second(times: list[float], start: float, end: float) -> list[int]:
    """Runs in each whole second from ``start`` to ``end``."""
    counts = [0] * max(0, int(end - start))
    for t in times:
        i = math.floor(t - start)
        if 0 <= i < len(counts):
            counts[i] += 1
    return counts


def smoothness(times: list[float], rate: float, start: float, end: float) -> dict[str, Any]:
    counts = per_second(times, start, end)
    if len(counts) < 2:
        return {"seconds": len(counts)}
    return {
        "seconds": len(counts),
        "rate": rate,
        "mean": sig(statistics.fmean(counts)),
        "stdev": sig(statistics.pstdev(counts)),
        "stdev_over_rate": sig(statistics.pstdev(counts) / rate),
        "min": min(counts),
        "max": max(counts),
    }


# Worker log lines worth a look: errors, tracebacks, and the gate's own warnings (but the
# one about persistence: the soak's Redis keeps nothing on disk on purpose).
TROUBLE = re.compile(r"ERROR|CRITICAL|Traceback|queue-ratelimit:(?!.*keeps nothing on disk)")


def log_problems(workers: list[W.WorkerProcess]) -> dict[str, Any]:
    """How many worker log lines look like trouble, and the first few."""
    lines = []
    for w in workers:
        try:
            text = w.log.read_text(errors="replace")
        except OSError:
            continue
        lines += [f"{w.name}: {line}" for line in text.splitlines() if TROUBLE.search(line)]
    return {"lines": len(lines), "first": lines[:10]}


# -- the run ---------------------------------------------------------------------------------
@dataclass
class Soak:
    """One soak run: its servers, workers, producers and what it saw."""

    settings: SoakSettings
    limiter_url: str
    records_url: str
    workdir: Path
    namespace: str = field(default_factory=lambda: f"soak{uuid.uuid4().hex[:8]}")
    workers: list[W.WorkerProcess] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    published: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    ran: Counter[str] = field(default_factory=Counter)
    runs: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    oneoff_published: int = 0
    framework_of: dict[str, str] = field(default_factory=dict)
    start_of: dict[str, float] = field(default_factory=dict)
    # The producer's longest step (seconds): a machine too busy to publish on time shows.
    slowest_step: float = 0.0

    def __post_init__(self) -> None:
        self.client = redis.Redis.from_url(self.limiter_url)
        self.records = redis.Redis.from_url(self.records_url)
        self.broker = broker_url_for(self.records_url)
        # A queue name each: Celery's and RQ's backlogs must not share a lane (each
        # framework's workers take whatever their lanes hold).
        self.celery_queue = f"soak-c-{self.namespace}"
        self.rq_queue = f"soak-r-{self.namespace}"
        self.key = f"soak:{self.namespace}:runs"
        self.limiter = Limiter(
            self.client, namespace=self.namespace, counter_retention=self.settings.retention
        )
        self._read = 0
        self._outstanding: Counter[str] = Counter()
        self._next_sample = 0.0

    # -- setting up ----------------------------------------------------------------------
    def configure(self) -> None:
        s = self.settings
        self.limiter.set_limit("global", GLOBAL_LIMIT)
        self.limiter.set_limit("tenant:*", ONEOFF_LIMIT)
        for stream in streams(s):
            self.limiter.set_limit(f"tenant:{stream.tenant}", Limit(s.rate, burst=s.burst))

    def start_workers(self) -> None:
        s = self.settings
        common: dict[str, Any] = {
            "redis_url": self.limiter_url, "namespace": self.namespace,
            "logdir": self.workdir, "record_url": self.records_url,
        }  # fmt: skip
        self.workers += W.start_celery_workers(
            count=s.celery_workers, concurrency=s.celery_concurrency, broker=self.broker,
            record_key=self.key, mode="fair", queue=self.celery_queue,
            settings={"counter_retention": s.retention, "dedupe_window": s.retention},
            **common,
        )  # fmt: skip
        self.workers += W.start_rq_workers(
            count=s.rq_workers, ours=True, simple=True, queue=self.rq_queue,
            env={"QUEUE_RATELIMIT_COUNTER_RETENTION": str(s.retention)}, **common,
        )  # fmt: skip

    # -- observing -----------------------------------------------------------------------
    def read_runs(self) -> None:
        """Take in the runs recorded since the last look."""
        rows = self.records.lrange(self.key, self._read, -1)
        self._read += len(rows)
        for raw in rows:
            job_id, tenant, _, start, _ = raw.decode().split()
            self.ran[job_id] += 1
            self.start_of[job_id] = float(start)
            self.runs[tenant].append(float(start))
            self._outstanding[tenant] -= 1

    def sample(self, phase: str, now: float) -> None:
        if now < self._next_sample:
            return
        self._next_sample = now + SAMPLE_EVERY
        self.samples.append({"t": round(now, 1), "phase": phase, **memory(self.client)})

    def check_workers(self) -> None:
        dead = [w for w in self.workers if not w.alive()]
        if dead:
            raise RuntimeError(f"worker {dead[0].name} exited:\n{dead[0].tail()}")

    # -- the load ------------------------------------------------------------------------
    def publish(self, framework: str, tenant: str, pattern: str) -> None:
        """One job for ``tenant`` through ``framework``'s producer (see ``producers``)."""
        at = time.time()
        if framework == "celery":
            task, pub = self._celery
            job_id = task.apply_async((tenant, "normal", 0), rate_tenant=tenant, producer=pub).id
        else:
            job_id = self._rq.enqueue(
                W.rq_record, self.key, tenant, "normal", 0, rate_tenant=tenant, result_ttl=0
            ).id
        self.published[job_id] = (tenant, pattern, at)
        self._outstanding[tenant] += 1
        self.framework_of[job_id] = framework

    @contextmanager
    def producers(self) -> Iterator[None]:
        """The Celery producer app (hints off: it only adds the rate headers) and our RQ
        queue (no hints either) that ``publish`` uses."""
        from queue_ratelimit.rq import Queue

        app = W.build_celery_app(
            mode="producer", broker=self.broker, redis_url=self.limiter_url,
            namespace=self.namespace, queue=self.celery_queue, record_key=self.key,
            record_url=self.records_url,
        )  # fmt: skip
        self._rq = Queue(
            self.rq_queue, connection=self.client, rate_namespace=self.namespace, rate_hints=False
        )
        try:
            with app.producer_or_acquire() as pub:
                self._celery = (app.tasks["bench.record"], pub)
                yield
        finally:
            W.uninstall_producer(app)

    def warm_up(self) -> None:
        """A few jobs through each framework, some held back by their limit, so every code
        path has loaded its scripts and made its long-lived keys before the baseline."""
        for framework in ("celery", "rq"):
            for _ in range(int(ONEOFF_LIMIT.burst) + 3):
                self.publish(framework, f"warmup-{framework}", "warmup")

    def load(self, started: float) -> None:
        s = self.settings
        plan = streams(s)
        last = started
        next_check = 0.0
        while True:
            now = time.monotonic()
            t = now - started
            if t >= s.seconds:
                break
            dt, last = now - last, now
            self.read_runs()
            for st in plan:
                if st.cap is not None and self._outstanding[st.tenant] >= st.cap:
                    continue  # the producer holds back: enough of its work waits
                st.due += st.rate(t) * dt
                while st.published < int(st.due):
                    self.publish(st.framework, st.tenant, st.pattern)
                    st.published += 1
            oneoff_due = int(s.oneoff * t / s.seconds)
            while self.oneoff_published < oneoff_due:
                n = self.oneoff_published
                # Three in four to Celery, whose workers take more per second here.
                framework = "rq" if n % 4 == 3 else "celery"
                self.publish(framework, f"o{n}-{self.namespace}", "oneoff")
                self.oneoff_published += 1
            self.sample("load", t)
            self.slowest_step = max(self.slowest_step, time.monotonic() - now)
            if t >= next_check:
                next_check += 10
                self.check_workers()
                ran = sum(self.ran.values())
                log(f"  {t:.0f} s: {len(self.published)} published, {ran} ran")
            time.sleep(max(0.0, TICK - (time.monotonic() - now)))

    def drain(self, started: float) -> float:
        """Wait until every job published has run; the seconds it took."""
        begun = time.monotonic()
        deadline = begun + self.settings.drain_timeout
        while True:
            self.read_runs()
            now = time.monotonic()
            self.sample("drain", now - started)
            missing = len(self.published) - len(self.ran.keys() & self.published.keys())
            if missing == 0:
                return now - begun
            if now > deadline:
                raise RuntimeError(
                    f"{missing} jobs did not run within {self.settings.drain_timeout} s "
                    "after the load"
                )
            self.check_workers()
            time.sleep(0.2)

    def settle(self, started: float) -> tuple[float, dict[str, int]]:
        """Wait until every key due to expire within the settle deadline has (RQ's worker
        keys aside, which live as long as their workers); the seconds it took, and the keys
        left: with no expiry (-1) or a longer one (their TTL, ms)."""
        begun = time.monotonic()
        deadline = begun + self.settings.settle_deadline
        horizon_ms = self.settings.settle_deadline * 1000
        while True:
            now = time.monotonic()
            self.sample("settle", now - started)
            ttls = self._ttls()
            due = [k for k, ttl in ttls.items() if 0 < ttl <= horizon_ms]
            if not [k for k in due if not k.startswith("rq:worker")]:
                break
            if now > deadline:
                log(f"  still expiring after {self.settings.settle_deadline} s: {due[:10]}")
                break
            time.sleep(1.0)
        return time.monotonic() - begun, dict(sorted(ttls.items()))

    def _ttls(self) -> dict[str, int]:
        """Every key of the limiter's Redis and its PTTL (-1: none)."""
        # (Counts the server keeps in memory first: they make keys of their own.)
        flush_counters(self.limiter)
        keys = [k.decode() for k in self.client.scan_iter(count=1000)]
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.pttl(k)
        return dict(zip(keys, pipe.execute(), strict=True))

    def collect_lua_garbage(self) -> None:
        self.client.function_load(GC_SOURCE, replace=True)
        try:
            self.client.fcall(f"{GC_LIBRARY}_collect", 0)
        finally:
            self.client.function_delete(GC_LIBRARY)

    # -- the report ------------------------------------------------------------------------
    def report(self, *, load_end: float, drain_s: float) -> dict[str, Any]:
        s = self.settings
        counts = self.ran
        jobs = {i: v for i, v in self.published.items() if v[1] != "warmup"}
        lost = [i for i in self.published if counts[i] == 0]
        twice = {i: n for i, n in counts.items() if n > 1}
        unknown = [i for i in counts if i not in self.published]
        plan = streams(s)
        caps: dict[str, Any] = {}
        for tenant in sorted({st.tenant for st in plan}):
            caps[f"tenant:{tenant}"] = cap_report(self.runs[tenant], s.rate, s.burst)
        everything = [t for times in self.runs.values() for t in times]
        caps["global"] = cap_report(everything, GLOBAL_LIMIT.rate, GLOBAL_LIMIT.burst)
        first = min(t for tenant, times in self.runs.items() if tenant.startswith(("c-", "r-"))
                    for t in times)  # fmt: skip
        smooth = {
            tenant: smoothness(self.runs[tenant], s.rate, first + 10, load_end - 5)
            for tenant in sorted({st.tenant for st in plan if st.pattern in SATURATED})
        }
        return {
            "lost": len(lost),
            "ran_twice": len(twice),
            "runs_of_unknown_jobs": len(unknown),
            "lost_examples": lost[:5],
            "twice_examples": dict(list(twice.items())[:5]),
            "cap_violations": sum(c["violations"] for c in caps.values()),
            "caps": caps,
            "smoothness": smooth,
            "oneoff_latency_ms": self.latency(jobs),
            "drain_seconds": sig(drain_s),
        }

    def latency(self, jobs: dict[str, tuple[str, str, float]]) -> dict[str, Any]:
        """Publish to start (ms) of the one-off jobs, which no limit holds back: how far
        the workers of each framework lagged behind the load."""
        waits: dict[str, list[float]] = defaultdict(list)
        for job_id, (_, pattern, at) in jobs.items():
            if pattern == "oneoff":
                waits[self.framework_of[job_id]].append((self.start_of[job_id] - at) * 1000)
        out = {}
        for framework, values in sorted(waits.items()):
            values.sort()
            out[framework] = {
                "jobs": len(values),
                "p50": sig(values[len(values) // 2]),
                "p99": sig(values[int(len(values) * 0.99)]),
                "max": sig(values[-1]),
            }
        return out


def _memory_summary(
    samples: list[dict[str, Any]], marks: dict[str, dict[str, int]]
) -> dict[str, Any]:
    """The memory fields (MiB) and key counts at each mark, and each one's peak."""

    def shown(m: dict[str, Any]) -> dict[str, Any]:
        out = {f"{name}_mib": sig(m[name] / 2**20) for name in MEMORY_FIELDS}
        return {**out, "keys": m["keys"]}

    peak = {name: max(s[name] for s in samples) for name in [*MEMORY_FIELDS, "keys"]}
    return {**{name: shown(m) for name, m in marks.items()}, "peak": shown(peak)}


def run_soak(settings: SoakSettings, records_url: str) -> dict[str, Any]:
    """One soak (see the module's docstring); the report as a dict."""
    with tempfile.TemporaryDirectory(prefix="qrl-soak-") as tmp:
        workdir = Path(tmp)
        with redis_server(workdir) as limiter_url:
            return _run(settings, limiter_url, records_url, workdir)


def _run(
    settings: SoakSettings, limiter_url: str, records_url: str, workdir: Path
) -> dict[str, Any]:
    soak = Soak(settings, limiter_url, records_url, workdir)
    try:
        soak.configure()
        log(f"== soak {settings.seconds:.0f} s, namespace {soak.namespace}")
        soak.start_workers()
        with soak.producers():
            soak.warm_up()
            soak.drain(time.monotonic())
            _, at_start = soak.settle(time.monotonic())
            marks = {"start": memory(soak.client)}
            soak.samples.clear()
            started = time.monotonic()
            soak.load(started)
        load_end = W.redis_now(soak.records)
        marks["end_of_load"] = memory(soak.client)
        log(f"  load done: {len(soak.published)} published; draining")
        drain_s = soak.drain(started)
        log(f"  drained in {drain_s:.1f} s; waiting for the expiries")
        settle_s, left = soak.settle(started)
        marks["after_expiry"] = memory(soak.client)
        soak.collect_lua_garbage()
        marks["after_lua_gc"] = memory(soak.client)
        soak.check_workers()
        result = {
            "settings": asdict(settings),
            "machine": machine_info(soak.client),
            "published": len(soak.published),
            "published_by_pattern": dict(Counter(p for _, p, _ in soak.published.values())),
            "jobs_per_second": sig(len(soak.published) / settings.seconds),
            "slowest_producer_step_s": sig(soak.slowest_step),
            **soak.report(load_end=load_end, drain_s=drain_s),
            "memory": _memory_summary(soak.samples, marks),
            "expiry_seconds": sig(settle_s),
            "keys_left": _shapes(left, soak.namespace),
            # Keys there after the expiries and not before the load (TTL s, None: none).
            "new_keys": {
                k: None if ttl == -1 else round(ttl / 1000)
                for k, ttl in left.items()
                if k not in at_start
            },
            "worker_log_lines": log_problems(soak.workers),
            # Every tenth sample (about one per 10 s): the memory over the run.
            "samples": soak.samples[::10],
        }
    finally:
        for w in soak.workers:
            w.kill()
        soak.records.delete(soak.key, W.celery_ready_key(soak.namespace))
        broker = redis.Redis.from_url(soak.broker)
        broker.delete(soak.celery_queue)
        broker.close()
    return result


def _shapes(ttls: dict[str, int], namespace: str) -> dict[str, dict[str, Any]]:
    """Keys by shape (the namespace as ``NS``, hex and digit runs as ``#``): how many, and
    the longest TTL among them in seconds (None: no expiry)."""
    shapes: dict[str, dict[str, Any]] = {}
    for key, ttl in ttls.items():
        shape = re.sub(r"[0-9a-f]{6,}|\d+", "#", key.replace(namespace, "NS"))
        entry = shapes.setdefault(shape, {"keys": 0, "ttl_s": None})
        entry["keys"] += 1
        if ttl > 0:
            entry["ttl_s"] = max(entry["ttl_s"] or 0, round(ttl / 1000))
    return dict(sorted(shapes.items()))


def run(redis_url: str) -> dict[str, Any]:
    """``python -m benchmarks soak``: records and the broker on ``redis_url``."""
    return run_soak(SoakSettings.from_env(), redis_url)
