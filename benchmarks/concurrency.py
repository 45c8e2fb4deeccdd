"""Concurrency caps with real workers: held, used, not in anyone else's way, and given back.

``python -m benchmarks concurrency`` prints one JSON object. Four kinds of workers, in
interleaved rounds on the same Redis server:

- ``celery``: two ``celery worker -P prefork -c 2`` processes (4 pool processes), Redis
  broker in the next database of the same server, ``install(app, lease=5)``, other settings
  at their defaults;
- ``celery_reserve_pool``: the same with ``reserve=2`` (a worker takes on from the fair
  backlog no more than its pool size; the default is four times that);
- ``rq``: four ``queue-ratelimit rq worker`` processes (RQ's forking ``Worker``);
- ``rq_simple``: the same with ``--simple`` (``SimpleWorker``).

A round (per kind): the workers start and announce themselves; the tenant ``capped`` gets
``set_concurrency("tenant:capped", CAP)`` and a backlog of ``QRL_CC_JOBS`` jobs of
``QRL_CC_JOB_S`` seconds; while it drains, a second, uncapped tenant ``free`` publishes one
short job every ``FREE_EVERY_S`` seconds (behind the capped backlog). Every job records its
start and its end on Redis's clock in one Lua call each, which also keeps a running count per
tenant (INCR at start, DECR at end) and its maximum, and counts executions per job id.

Figures per kind (medians over rounds, and each round's):

- ``max_running_by_jobs``: the most capped jobs running at once by the jobs' own counter
  (target <= CAP), and ``max_running_by_limiter``: the most live slots ``Limiter.running``
  showed while the round ran (sampled every 20 ms);
- ``utilisation``: the time average of the capped jobs' running count over the contended
  window (from the first capped start to the last capped start, while jobs waited) / CAP;
  target >= 0.95;
- ``free_latency_s``: from publishing a ``free`` job (Redis TIME) to its start; target: the
  slowest within ``FREE_TARGET_S``;
- ``slot_occupancy``: live slots (``Limiter.running``, sampled) / CAP over the same window;
- ``gap_ms``: from a capped job's end to the start that took its place (p50, p90);
- a baseline per kind and round, run back to back with it: no cap, exactly CAP worker
  processes (Celery: one worker ``-c CAP``; RQ: CAP workers), the same capped jobs and no
  free tenant: how busy CAP processes keep themselves (the ceiling for a cap of CAP);
- ``executions``: every job ran exactly once; ``slots_left``: ``running("tenant:capped")``
  once the round is over (0: every slot was given back when its job ended).

Then, once per kind (not ``celery_reserve_pool``), SIGKILL: one worker alone runs
``KILL_CAP`` long jobs of a tenant with that cap (RQ: 1, a worker runs one job at a time);
another worker starts; the next job of that tenant is published (the cap holds it back); the
first worker's process group is killed, and the time from the kill to that next job's start
is measured (target: within the slot's hold, 5 s for Celery's ``lease`` here, 60 s for RQ,
plus ``KILL_SLACK_S``), with the moment ``Limiter.running`` dropped below the cap.

Environment: ``QRL_BENCH_ROUNDS`` (default 3), ``QRL_CC_JOBS`` (default 120),
``QRL_CC_JOB_S`` (default 0.1), ``QRL_CC_KINDS`` (comma-separated subset of the kinds),
``QRL_CC_KILL`` ("0" skips the SIGKILL part), ``QRL_CC_RQ_WORKERS`` (default 4),
``QRL_CC_FREE_JOBS`` (default 10; 0: no second tenant).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from queue_ratelimit import Limiter

from ._common import broker_url_for, env_float, env_int, log, machine_info, median, sig

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KINDS = ("celery", "celery_reserve_pool", "rq", "rq_simple")
CAP = 3
CELERY_WORKERS, CELERY_CONCURRENCY = 2, 2
# Celery settings besides the defaults (and lease), per kind: ``celery_reserve_pool`` lets a
# worker take on no more from the fair backlog than it has pool processes.
CELERY_SETTINGS: dict[str, dict[str, Any]] = {
    "celery_reserve_pool": {"reserve": CELERY_CONCURRENCY}
}
RQ_WORKERS = int(os.environ.get("QRL_CC_RQ_WORKERS") or 4)
CELERY_LEASE = 5.0
RQ_HOLD = 60.0  # the RQ integration's scheduler lease: a slot's hold, renewed while it runs
FREE_JOBS = int(os.environ.get("QRL_CC_FREE_JOBS") or 10)  # 0: no second tenant
FREE_EVERY_S = 0.25
FREE_TARGET_S = 0.5
TARGET_UTILISATION = 0.95
KILL_CAP = 2  # Celery: one -c 2 worker holds both slots; RQ: one job per worker, so 1
KILL_SLACK_S = 1.0
SAMPLE_S = 0.02

# One Lua call at a job's start and one at its end, on Redis's clock. KEYS: the tenant's
# running counter, its maximum, the executions hash, the event log. ARGV: job id, tenant,
# the time it was published ("-" if not recorded), "<parent pid>/<pid>" of the process.
_START = """
local t = redis.call('TIME')
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
redis.call('RPUSH', KEYS[4], 's ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. t[1] .. '.' ..
  string.format('%06d', t[2]) .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
return n
"""
_END = """
local t = redis.call('TIME')
redis.call('DECR', KEYS[1])
redis.call('RPUSH', KEYS[2], 'e ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. t[1] .. '.' ..
  string.format('%06d', t[2]))
return 1
"""


def _keys(run: str, tenant: str) -> tuple[str, str, str, str]:
    base = f"bench:cc:{run}"
    return f"{base}:cur:{tenant}", f"{base}:max:{tenant}", f"{base}:execs", f"{base}:log"


_clients: dict[str, tuple[redis.Redis, Any, Any]] = {}


def _recorder(url: str) -> tuple[redis.Redis, Any, Any]:
    """A client and the two scripts, per process (a forked child makes its own)."""
    key = f"{os.getpid()}:{url}"
    found = _clients.get(key)
    if found is None:
        client = redis.Redis.from_url(url)
        found = _clients[key] = (
            client,
            client.register_script(_START),
            client.register_script(_END),
        )
    return found


def job(url: str, run: str, job_id: str, tenant: str, seconds: float, published: str) -> None:
    """The measured job (RQ imports it by name; the Celery task calls it): record the start,
    sleep ``seconds``, record the end."""
    _, start, end = _recorder(url)
    cur, top, execs, events = _keys(run, tenant)
    where = f"{os.getppid()}/{os.getpid()}"
    start(keys=[cur, top, execs, events], args=[job_id, tenant, published, where])
    time.sleep(seconds)
    end(keys=[cur, events], args=[job_id, tenant])


# -- Celery ------------------------------------------------------------------------------
def _ready_key(run: str) -> str:
    return f"bench:cc:{run}:ready"


def make_app(*, broker: str, redis_url: str, namespace: str, queue: str) -> Any:
    """The Celery app of workers and producer: ``install`` with a short lease, one task."""
    from celery import Celery
    from celery.signals import worker_ready

    from queue_ratelimit.celery import install

    app = Celery(f"cc-{namespace}", broker=broker)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    # QRL_CC_CELERY_SETTINGS: JSON of further settings, for experiments (e.g. {"reserve": 2}).
    extra = json.loads(os.environ.get("QRL_CC_CELERY_SETTINGS") or "{}")
    install(app, redis_url=redis_url, namespace=namespace, lease=CELERY_LEASE, hints=False, **extra)

    @app.task(name="bench.cc", shared=False)
    def cc(job_id: str, tenant: str, seconds: float, published: str) -> None:
        job(redis_url, namespace, job_id, tenant, seconds, published)

    @worker_ready.connect(weak=False)
    def announce(sender: Any = None, **_: Any) -> None:
        client = redis.Redis.from_url(redis_url)
        client.hset(_ready_key(namespace), str(getattr(sender, "hostname", "?")), os.getpid())
        client.close()

    return app


def _app_from_env() -> Any:
    env = os.environ
    if "QRL_CC_BROKER" not in env:
        return None
    return make_app(
        broker=env["QRL_CC_BROKER"],
        redis_url=env["QRL_CC_REDIS"],
        namespace=env["QRL_CC_NAMESPACE"],
        queue=env["QRL_CC_QUEUE"],
    )


# Celery workers start this module: ``celery -A benchmarks.concurrency worker``.
app = _app_from_env()


# -- workers -----------------------------------------------------------------------------
class Workers:
    """The worker processes of one kind for one run (namespace), each in its own group."""

    def __init__(self, kind: str, redis_url: str, broker: str, logdir: Path) -> None:
        self.kind, self.redis_url, self.broker, self.logdir = kind, redis_url, broker, logdir
        self.celery = kind.startswith("celery")
        self.settings = CELERY_SETTINGS.get(kind, {})
        self.run = f"cc{uuid.uuid4().hex[:8]}"
        self.queue = f"q-{self.run}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.client = redis.Redis.from_url(redis_url)
        self.limiter = Limiter(self.client, namespace=self.run)
        self._producer: Any = None
        self._rq_queue: Any = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            QRL_CC_BROKER=self.broker,
            QRL_CC_REDIS=self.redis_url,
            QRL_CC_NAMESPACE=self.run,
            QRL_CC_QUEUE=self.queue,
            QUEUE_RATELIMIT_NAMESPACE=self.run,
            QRL_CC_CELERY_SETTINGS=json.dumps(self.settings),
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        )
        return env

    def start(self, name: str, concurrency: int = CELERY_CONCURRENCY) -> None:
        if self.celery:
            args = [
                sys.executable, "-m", "celery", "-A", "benchmarks.concurrency", "worker",
                "-P", "prefork", "-c", str(concurrency), "--without-gossip",
                "--without-mingle", "--without-heartbeat", "-n", f"{name}.{self.run}@%h",
                "-Q", self.queue, "--loglevel", "WARNING",
            ]  # fmt: skip
        else:
            args = [str(BIN / "queue-ratelimit"), "--namespace", self.run, "rq", "worker"]
            if self.kind == "rq_simple":
                args.append("--simple")
            args += [self.queue, "--url", self.redis_url, "--name", f"{self.run}-{name}"]
        log_path = self.logdir / f"{self.run}-{name}.log"
        with log_path.open("ab") as out:
            self.procs[name] = subprocess.Popen(
                args, cwd=ROOT, env=self._env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def ready(self, *names: str, timeout: float = 60.0) -> None:
        """Wait until the named workers consume (Celery: ``worker_ready``; RQ: registered)."""
        deadline = time.monotonic() + timeout
        while True:
            for name in names:
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"worker {name} exited: {self.tail(name)}")
            if self.celery:
                hosts = {h.decode() for h in self.client.hkeys(_ready_key(self.run))}
                ok = all(any(h.startswith(f"{n}.") for h in hosts) for n in names)
            else:
                ok = all(self.client.exists(f"rq:worker:{self.run}-{n}") for n in names)
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {names} not ready: {self.tail(names[0])}")
            time.sleep(0.05)

    def tail(self, name: str) -> str:
        path = self.logdir / f"{self.run}-{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def publish(self, job_id: str, tenant: str, seconds: float, stamp: bool = False) -> None:
        """One job of ``tenant``; with ``stamp``, the Redis time of publishing travels along."""
        published = "-"
        if stamp:
            s, us = self.client.time()
            published = f"{s}.{us:06d}"
        if self.celery:
            if self._producer is None:
                self._producer = make_app(
                    broker=self.broker, redis_url=self.redis_url, namespace=self.run,
                    queue=self.queue,
                )  # fmt: skip
            self._producer.tasks["bench.cc"].apply_async(
                (job_id, tenant, seconds, published), rate_tenant=tenant
            )
        else:
            if self._rq_queue is None:
                from queue_ratelimit.rq import Queue

                self._rq_queue = Queue(self.queue, connection=self.client, rate_namespace=self.run)
            self._rq_queue.enqueue(
                "benchmarks.concurrency.job",
                self.redis_url, self.run, job_id, tenant, seconds, published,
                rate_tenant=tenant, job_id=f"{self.run}-{job_id}",
            )  # fmt: skip

    def events(self) -> list[tuple[str, str, str, float, float | None]]:
        """(kind s/e, job id, tenant, time, published or None) in order."""
        out = []
        for raw in self.client.lrange(_keys(self.run, "-")[3], 0, -1):
            parts = raw.decode().split()
            published = float(parts[4]) if len(parts) > 4 and parts[4] != "-" else None
            out.append((parts[0], parts[1], parts[2], float(parts[3]), published))
        return out

    def busiest_worker_share(self, tenant: str) -> float:
        """The largest share of ``tenant``'s jobs that one worker ran (Celery and forking
        RQ: the job's parent process; SimpleWorker: the job's own process)."""
        counts: dict[str, int] = {}
        for raw in self.client.lrange(_keys(self.run, "-")[3], 0, -1):
            parts = raw.decode().split()
            if parts[0] == "s" and parts[2] == tenant and len(parts) > 5:
                ppid, pid = parts[5].split("/")
                who = pid if self.kind == "rq_simple" else ppid
                counts[who] = counts.get(who, 0) + 1
        return max(counts.values()) / sum(counts.values()) if counts else float("nan")

    def executions(self) -> dict[str, int]:
        raw = self.client.hgetall(_keys(self.run, "-")[2])
        return {k.decode(): int(v) for k, v in raw.items()}

    def max_running(self, tenant: str) -> int:
        return int(self.client.get(_keys(self.run, tenant)[1]) or 0)

    def close(self) -> None:
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM if self.celery else signal.SIGKILL)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill(name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # pool children or a horse left behind
        if self._producer is not None:
            from celery.signals import before_task_publish

            before_task_publish.disconnect(dispatch_uid=f"queue_ratelimit:{id(self._producer)}")
            self._producer.close()
        keys = list(self.client.scan_iter(match=f"*{self.run}*", count=1000))
        for start in range(0, len(keys), 500):
            self.client.delete(*keys[start : start + 500])
        if self.celery:
            broker = redis.Redis.from_url(self.broker)
            stale = list(broker.scan_iter(match=f"*{self.run}*", count=1000))
            if stale:
                broker.delete(*stale)
            broker.close()
        self.limiter.close()


def _redis_now(client: redis.Redis) -> float:
    s, us = client.time()
    return s + us / 1e6


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class _Sampler(threading.Thread):
    """Polls ``Limiter.running(scope)`` and keeps the largest value seen."""

    def __init__(self, limiter: Limiter, scope: str) -> None:
        super().__init__(daemon=True)
        self.limiter, self.scope = limiter, scope
        self.most = 0
        self.samples: list[tuple[float, int]] = []  # (wall-clock time, live slots)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            n = self.limiter.running(self.scope)
            self.samples.append((time.time(), n))
            self.most = max(self.most, n)
            self.stop.wait(SAMPLE_S)

    def occupancy(self, lo: float, hi: float, cap: int) -> float:
        """Mean live slots / cap over samples in [lo, hi] (Redis runs on this host: its TIME
        and this wall clock are the same clock)."""
        inside = [n for t, n in self.samples if lo <= t <= hi]
        return sum(inside) / (len(inside) * cap) if inside else float("nan")


def _spans(events: list[Any], tenant: str) -> dict[str, list[float]]:
    """job id -> [start, end] of ``tenant``'s jobs."""
    spans: dict[str, list[float]] = {}
    for kind, job_id, who, at, _ in events:
        if who != tenant:
            continue
        if kind == "s":
            spans[job_id] = [at, float("nan")]
        elif job_id in spans:
            spans[job_id][1] = at
    return spans


def _gaps(spans: list[list[float]], cap: int) -> list[float]:
    """Seconds from a capped job's end to the start that took its place: at saturation the
    k-th start (k >= cap) follows the (k - cap)-th end."""
    starts = sorted(s for s, _ in spans)
    ends = sorted(e for _, e in spans)
    return [starts[k] - ends[k - cap] for k in range(cap, len(starts))]


def _utilisation(spans: list[list[float]], cap: int) -> tuple[float, float, int]:
    """(time average of the running count / cap, window seconds, max overlap) over the
    window from the first start to the last start (jobs were waiting all along)."""
    lo = min(s for s, _ in spans)
    hi = max(s for s, _ in spans)
    busy = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in spans)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return busy / ((hi - lo) * cap), hi - lo, most


def _round(
    kind: str,
    redis_url: str,
    broker: str,
    logdir: Path,
    jobs: int,
    job_s: float,
    *,
    baseline: bool = False,
) -> dict[str, Any]:
    """One round of a kind. ``baseline``: no cap at all, and exactly CAP worker processes
    (Celery: one worker -c CAP; RQ: CAP workers), no free tenant: how busy CAP processes
    keep themselves with the same jobs, the ceiling a cap of CAP can be compared with."""
    w = Workers(kind, redis_url, broker, logdir)
    if baseline:
        w.settings = {}  # the baseline is CAP processes with the defaults, whatever the kind
    try:
        if baseline:
            names = ["w0"] if kind.startswith("celery") else [f"w{i}" for i in range(CAP)]
            for name in names:
                w.start(name, concurrency=CAP)
        else:
            w.limiter.set_concurrency("tenant:capped", CAP)
            names = [
                f"w{i}" for i in range(CELERY_WORKERS if kind.startswith("celery") else RQ_WORKERS)
            ]
            for name in names:
                w.start(name)
        w.ready(*names)
        sampler = _Sampler(w.limiter, "tenant:capped")
        sampler.start()
        for i in range(jobs):
            w.publish(f"c{i}", "capped", job_s)
        free_jobs = 0 if baseline else FREE_JOBS
        for i in range(free_jobs):  # behind the capped backlog, while it drains
            time.sleep(FREE_EVERY_S)
            w.publish(f"f{i}", "free", job_s, stamp=True)
        total = jobs + free_jobs
        _wait(
            lambda: sum(1 for e in w.events() if e[0] == "e") >= total,
            timeout=60 + jobs * job_s / CAP * 3,
            what=f"{total} jobs to end ({kind})",
        )
        time.sleep(0.3)  # anything that would run twice, or a slot released late
        sampler.stop.set()
        sampler.join()
        slots_left = w.limiter.running("tenant:capped")
        events = w.events()
        execs = w.executions()
        spans = list(_spans(events, "capped").values())
        util, window, overlap = _utilisation(spans, CAP)
        lo, hi = min(a for a, _ in spans), max(a for a, _ in spans)
        free = [at - pub for k, _, who, at, pub in events if k == "s" and who == "free" and pub]
        expected = {f"c{i}" for i in range(jobs)} | {f"f{i}" for i in range(free_jobs)}
        gaps = _gaps(spans, CAP)
        return {
            "max_running_by_jobs": w.max_running("capped"),
            "max_overlap_by_times": overlap,
            "max_running_by_limiter": sampler.most,
            "utilisation": util,
            "slot_occupancy": sampler.occupancy(lo, hi, CAP),
            "busiest_worker_share": w.busiest_worker_share("capped"),
            "window_s": window,
            "gap_ms_p50": median(gaps) * 1e3,
            "gap_ms_p90": sorted(gaps)[int(len(gaps) * 0.9)] * 1e3,
            "free_latency_s": sorted(free),
            "lost": len(expected - set(execs)),
            "twice": sum(1 for n in execs.values() if n > 1),
            "unexpected": len(set(execs) - expected),
            "slots_left": slots_left,
        }
    finally:
        w.close()


def _kill(kind: str, redis_url: str, broker: str, logdir: Path) -> dict[str, Any]:
    """A worker holding every slot of a cap is SIGKILLed: when does the cap admit again?"""
    cap = KILL_CAP if kind.startswith("celery") else 1
    hold = CELERY_LEASE if kind.startswith("celery") else RQ_HOLD
    w = Workers(kind, redis_url, broker, logdir)
    try:
        w.limiter.set_concurrency("tenant:k", cap)
        w.start("victim")
        w.ready("victim")
        for i in range(cap):
            w.publish(f"long{i}", "k", 600.0)
        _wait(lambda: w.max_running("k") >= cap, 30, "the victim running every capped job")
        w.start("survivor")
        w.ready("survivor")
        w.publish("next", "k", 0.05, stamp=True)
        time.sleep(1.0)  # the survivor has seen it and been denied by the cap
        held_back = not any(e[1] == "next" for e in w.events())
        w.kill("victim")
        killed_at = _redis_now(w.client)
        _wait(lambda: w.limiter.running("tenant:k") < cap, hold + 30, "a slot to come back")
        freed_at = _redis_now(w.client)
        _wait(lambda: any(e[1] == "next" for e in w.events()), 30, "the next job to start")
        started = next(e[3] for e in w.events() if e[0] == "s" and e[1] == "next")
        _wait(lambda: any(e[0] == "e" and e[1] == "next" for e in w.events()), 30, "its end")
        time.sleep(0.5)
        execs = w.executions()
        return {
            "cap": cap,
            "hold_s": hold,
            "next_job_held_back_before_kill": held_back,
            "slot_back_after_s": sig(freed_at - killed_at, 3),
            "admitted_after_s": sig(started - killed_at, 3),
            "target_s": hold + KILL_SLACK_S,
            "met": held_back and started - killed_at <= hold + KILL_SLACK_S,
            "executions": execs,
        }
    finally:
        w.close()


def run(redis_url: str) -> dict[str, Any]:
    rounds = env_int("QRL_BENCH_ROUNDS", 3)
    jobs = env_int("QRL_CC_JOBS", 120)
    job_s = env_float("QRL_CC_JOB_S", 0.1)
    wanted = os.environ.get("QRL_CC_KINDS", ",".join(KINDS)).split(",")
    kinds = [k for k in KINDS if k in wanted]
    broker = broker_url_for(redis_url)
    redis.Redis.from_url(broker).flushdb()
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / "qrl-bench-concurrency"
    logdir.mkdir(parents=True, exist_ok=True)

    per_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    base: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for r in range(rounds):
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
        for kind in order:
            # Capped and baseline back to back, their order alternating round by round.
            for baseline in (False, True) if r % 2 == 0 else (True, False):
                got = _round(kind, redis_url, broker, logdir, jobs, job_s, baseline=baseline)
                (base if baseline else per_kind)[kind].append(got)
                lat = got["free_latency_s"] or [0.0]
                log(
                    f"   round {r + 1} {kind}{' baseline' if baseline else ''}: max running "
                    f"{got['max_running_by_jobs']} (limiter {got['max_running_by_limiter']}), "
                    f"utilisation {got['utilisation']:.3f} (slots {got['slot_occupancy']:.3f}), "
                    f"busiest worker {got['busiest_worker_share']:.2f}, "
                    f"gap p50 {got['gap_ms_p50']:.0f} ms "
                    f"p90 {got['gap_ms_p90']:.0f} ms, free latency p50 {median(lat):.3f} s "
                    f"max {max(lat):.3f} s, lost {got['lost']} twice {got['twice']}, slots "
                    f"left {got['slots_left']}"
                )
    kills: dict[str, Any] = {}
    if os.environ.get("QRL_CC_KILL", "1") != "0":
        for kind in [k for k in kinds if k != "celery_reserve_pool"]:
            kills[kind] = _kill(kind, redis_url, broker, logdir)
            log(f"   SIGKILL {kind}: {kills[kind]}")

    out: dict[str, Any] = {
        "config": {
            "cap": CAP,
            "jobs_per_round": jobs,
            "job_s": job_s,
            "free_jobs": FREE_JOBS,
            "free_every_s": FREE_EVERY_S,
            "rounds": rounds,
            "celery": f"{CELERY_WORKERS} workers, prefork -c {CELERY_CONCURRENCY}, "
            f"redis broker, lease {CELERY_LEASE} s",
            "rq": f"{RQ_WORKERS} workers (queue-ratelimit rq worker), slot hold {RQ_HOLD} s",
        },
    }
    for kind, rows in per_kind.items():
        lat = [x for row in rows for x in row["free_latency_s"]]
        most = max(row["max_running_by_jobs"] for row in rows)
        util = median(row["utilisation"] for row in rows)
        worst = max(lat, default=0.0)
        lost = sum(row["lost"] for row in rows)
        twice = sum(row["twice"] for row in rows)
        left = max(row["slots_left"] for row in rows)
        out[kind] = {
            "max_running": {
                "by_jobs": most,
                "by_limiter": max(row["max_running_by_limiter"] for row in rows),
                "per_round": [row["max_running_by_jobs"] for row in rows],
                "target": f"<= {CAP}",
                "met": most <= CAP,
            },
            "utilisation": {
                "median": sig(util, 4),
                "per_round": [sig(row["utilisation"], 4) for row in rows],
                "window_s": [sig(row["window_s"], 3) for row in rows],
                "target": f">= {TARGET_UTILISATION}",
                "met": util >= TARGET_UTILISATION,
                # Live slots (Limiter.running, sampled every 20 ms) / CAP over the same window:
                # near 1 with a lower utilisation means slots held by jobs not yet running.
                "slot_occupancy_per_round": [sig(row["slot_occupancy"], 3) for row in rows],
                # The largest share of the capped jobs that one worker ran, per round.
                "busiest_worker_share_per_round": [
                    sig(row["busiest_worker_share"], 3) for row in rows
                ],
                # From a capped job's end to the next capped start (ms), and the same
                # figures for CAP processes and no cap (the baseline).
                "gap_ms_p50": sig(median(row["gap_ms_p50"] for row in rows), 3),
                "gap_ms_p90": sig(median(row["gap_ms_p90"] for row in rows), 3),
                "baseline_no_cap_cap_processes": {
                    "median": sig(median(row["utilisation"] for row in base[kind]), 4),
                    "per_round": [sig(row["utilisation"], 4) for row in base[kind]],
                    "gap_ms_p50": sig(median(row["gap_ms_p50"] for row in base[kind]), 3),
                    "gap_ms_p90": sig(median(row["gap_ms_p90"] for row in base[kind]), 3),
                },
                "ratio_to_baseline_per_round": [
                    sig(row["utilisation"] / b["utilisation"], 3)
                    for row, b in zip(rows, base[kind], strict=True)
                ],
            },
            "free_tenant_latency_s": {
                "p50": sig(median(lat), 3) if lat else None,
                "max": sig(worst, 3),
                "per_round_max": [sig(max(row["free_latency_s"], default=0.0), 3) for row in rows],
                "target": f"max <= {FREE_TARGET_S}",
                "met": worst <= FREE_TARGET_S,
            },
            "exactly_once": {
                "lost": lost,
                "ran_twice": twice,
                "unexpected": sum(row["unexpected"] for row in rows),
                "met": lost == 0 and twice == 0,
            },
            "slots_left_after": {"max": left, "met": left == 0},
        }
        if kind in kills:
            out[kind]["sigkill"] = kills[kind]
    admin = redis.Redis.from_url(redis_url)
    out["machine"] = {**machine_info(admin), "loadavg": os.getloadavg()}
    admin.close()
    return out


if __name__ == "__main__":
    url = os.environ.get("REDIS_URL")
    if not url:
        sys.exit("set REDIS_URL (tests/run_with_redis.sh starts a throwaway server)")
    json.dump(run(url), sys.stdout, indent=2)
    sys.stdout.write("\n")
