"""Faults injected into the limiter's Redis and the workers while Celery and RQ work flows.

Each scenario runs two Celery workers (prefork, ``-c 2``) and two of our RQ ``SimpleWorker``
on a limiter Redis of its own, a producer publishing 30 jobs per second through each, and
limits that park part of the work (``fault_support``). It injects one fault, then checks
that every job published ran (exactly once, or as stated), and reports what it measured
(``pytest -s``, or ``QRL_FAULTS_REPORT=<file>``): docs/reliability.md, "Faults", is written
from those figures. Redis restarts with persistence and a killed worker are also covered by
tests/test_celery_e2e.py and tests/test_rq_e2e.py (referenced there).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS_SERVER, RedisProcess
from e2e_support import report_logs_on_failure
from fault_support import LEASE, FaultEnv, report

from queue_ratelimit import FairScheduler, Limit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.faults,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]

AOF = ["--appendonly", "yes", "--appendfsync", "always"]
# Log lines that tell what the workers went through.
SIGNS = (
    "Redis unreachable",
    "reachable again",
    "no reply from Redis",
    "dropping duplicate delivery",
    "no longer in flight",
    "Traceback",
)


@pytest.fixture
def make_env(
    redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., FaultEnv]]:
    """A factory: a FaultEnv on a limiter Redis of its own (``extra``: its arguments)."""
    report_logs_on_failure(request.config, "fault_env", "worker logs")
    made: list[FaultEnv] = []

    def make(extra: list[str] | None = None, **options: Any) -> FaultEnv:
        server = RedisProcess(tmp_path / "limiter", extra=extra).start()
        env = FaultEnv(server, redis_url, tmp_path, **options)
        made.append(env)
        request.node.funcargs["fault_env"] = env  # its logs on failure
        env.configure()
        return env

    yield make
    for env in made:
        env.close()
        env.server.stop()


def flowing(env: FaultEnv, count: int) -> None:
    """Wait until ``count`` jobs of each framework have run (work is flowing)."""

    def enough() -> bool:
        runs = env.runs()
        return all(sum(r.job_id.startswith(p) for r in runs) >= count for p in ("c-", "r-"))

    env.wait(enough, timeout=60, what=f"{count} runs through each framework")


def settle_all(env: FaultEnv, *, timeout: float = 120, rq_may_hold: bool = False) -> float:
    """Stop producing and wait until every job published (and not refused) has run, with
    exited workers restarted meanwhile; seconds from now until then. ``rq_may_hold``: RQ
    jobs may instead be held by RQ's own bookkeeping (``FaultEnv.held_by_rq``) once nothing
    of the RQ queue waits any more."""
    env.stop_producing()
    begun = time.monotonic()
    accepted = {i for i, p in env.published.items() if not p.refused}
    scheduler = FairScheduler(env.limiter)

    def done() -> bool:
        missing = accepted - set(env.starts())
        if not missing:
            return True
        if not rq_may_hold or set(env.held_by_rq(missing)) != missing:
            return False
        idle = env.client.llen(f"rq:queue:{env.rq_queue}") == 0
        return idle and scheduler.backlog(env.rq_queue) == 0

    env.wait(done, timeout=timeout, what="every job", supervise=True)
    # A job run twice shows up a moment after its first run, if at all.
    time.sleep(0.5)
    return time.monotonic() - begun


def caught_up(env: FaultEnv, moment: float) -> float | None:
    """Seconds from ``moment`` (records clock) until every job published before it that
    ran to its end had started (None: none did)."""
    before = {i for i, p in env.published.items() if p.at <= moment and not p.refused}
    starts: dict[str, float] = {}
    for r in env.runs():
        starts.setdefault(r.job_id, r.start)
    ended = [starts[i] for i in before if i in starts]
    return round(max(ended) - moment, 2) if ended else None


def assert_none_lost(outcome: dict[str, Any], *, twice_allowed: int = 0) -> None:
    for framework, o in outcome.items():
        assert o["lost"] == [], f"{framework}: {len(o['lost'])} jobs never ran"
        assert len(o["twice"]) <= twice_allowed, f"{framework}: ran twice {o['twice']}"


def runs_by_framework(runs: list[Any]) -> dict[str, int]:
    return {f: sum(r.job_id.startswith(f[0] + "-") for r in runs) for f in ("celery", "rq")}


def summary(outcome: dict[str, Any]) -> dict[str, Any]:
    """The outcome with counts instead of id lists (for the report); RQ's ``held_by_rq``
    says how many jobs RQ failed or left started (by status)."""
    return {f: {**o, "lost": len(o["lost"]), "twice": len(o["twice"])} for f, o in outcome.items()}


# -- SIGSTOP -------------------------------------------------------------------------------------
# The SIGSTOP scenario's stop (seconds): three times the scenario's lease (5 s). Nobody can
# renew a lease while Redis is stopped, so every lease in flight runs out during the stop;
# the scheduler finds the silence when Redis answers again and gives those leases one more
# lease of grace (scheduler.lua, "Silences"), in which their workers renew or settle them.
# (Before that, the first dispatch after SIGCONT reaped them and they ran twice: with acks
# early 1-3 jobs a run, with acks_late and 0.1 s jobs 3; the scenario ran with a 30 s lease.)
STOP_SECONDS = 15
assert STOP_SECONDS > 2 * LEASE


@pytest.mark.parametrize(
    "options",
    [{}, {"acks_late": True, "job_seconds": 0.1}],
    ids=["acks-early", "acks-late"],
)
def test_a_stopped_redis_stalls_then_recovers_and_loses_nothing(
    make_env: Callable[..., FaultEnv], options: dict[str, Any]
) -> None:
    """The limiter's Redis is SIGSTOPped for 15 s, three leases, under load, then continued.

    Celery: the gate's calls time out (2 s each, its client's timeout) and it fails open, so
    work published meanwhile runs unthrottled and slowly; what it had sent on its wire is
    dropped after 10 s and handled as in doubt. RQ: its jobs live on that Redis, so its
    workers and producer wait (the producer's calls time out: those jobs count as refused,
    but one may still have gone in). Every lease in flight runs out during the stop: the
    scheduler holds them back for a lease after the stop, and their workers renew or settle
    them. Afterwards every job has run, none twice."""
    env = make_env(**options)
    env.start_celery()
    env.start_rq()
    env.start_producing()
    flowing(env, 100)
    assert env.server.proc is not None
    pid = env.server.proc.pid
    stopped_at = env.now()
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + STOP_SECONDS  # the fault's length, not a synchronisation
        while time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed_at = env.now()
    during = [r for r in env.runs() if stopped_at < r.start <= resumed_at]
    # Some more load after the fault, then the end.
    env.wait(lambda: env.now() > resumed_at + 5, timeout=30, what="5 s of load after")
    drain = settle_all(env)
    outcome = env.outcome()
    report(
        "sigstop-15s" + ("-acks-late" if options else ""),
        {
            "runs_during": runs_by_framework(during),
            "first_run_after_resume_s": env.first_run_after(resumed_at),
            "caught_up_after_resume_s": caught_up(env, resumed_at),
            "drain_after_load_s": round(drain, 1),
            "outcome": summary(outcome),
            "log": env.log_lines(*SIGNS),
            "workers_restarted": env.restarted,
        },
    )
    assert_none_lost(outcome)


# -- a restart, with and without persistence -------------------------------------------------
@pytest.mark.parametrize("aof", [True, False], ids=["aof", "no-persistence"])
def test_a_restart_loses_only_what_redis_alone_held_without_persistence(
    make_env: Callable[..., FaultEnv], aof: bool
) -> None:
    """The limiter's Redis is killed (SIGKILL) with work parked, and started again.

    With AOF (fsync always) nothing is lost: the parked backlog, the limits and RQ's jobs come
    back and drain. Without persistence, everything only Redis held is gone: Celery's parked
    messages (acknowledged to the broker when they were parked), every RQ job not yet run
    (RQ keeps its jobs there), and the limits themselves (until set again; a worker seeds
    its ``limits`` setting only when it starts). Work published afterwards runs."""
    env = make_env(AOF if aof else None)
    env.limiter.set_limit("tenant:*", Limit(1, per=60, burst=1))  # one job each, then parked
    env.start_celery()
    env.start_rq()
    scheduler = FairScheduler(env.limiter)
    for _ in range(12):
        env.publish("celery", "ca")
        env.publish("rq", "ra")

    def all_parked() -> bool:
        runs = env.runs()
        return (
            sum(r.job_id.startswith("c-") for r in runs) == 1
            and sum(r.job_id.startswith("r-") for r in runs) == 1
            and scheduler.backlog(env.celery_queue) == 11
            and scheduler.backlog(env.rq_queue) + env.client.llen(f"rq:queue:{env.rq_queue}") == 11
        )

    env.wait(all_parked, timeout=30, what="one job of each run, the rest parked")
    waiting = set(env.published) - set(env.starts())
    env.server.stop()  # SIGKILL: a crash
    env.server.start()
    env.client.connection_pool.disconnect()
    restarted_at = env.now()
    limits_after = env.limiter.limits()
    env.limiter.set_limit("tenant:*", Limit(50, burst=10))  # let the parked work drain
    fresh = {env.publish(f, "b") for f in ("celery", "rq") for _ in range(5)}
    env.wait(lambda: env.ran_all(fresh), timeout=60, what="work published after", supervise=True)
    if aof:
        env.wait(lambda: env.ran_all(waiting), timeout=60, what="the parked work", supervise=True)
    else:
        # A negative check over a while: past a lease and a few polls, nothing comes back.
        until = time.monotonic() + LEASE + 2
        while time.monotonic() < until:
            env.revive()
            time.sleep(0.2)
    time.sleep(0.5)
    outcome = env.outcome()
    lost = {f: len(o["lost"]) for f, o in outcome.items()}
    report(
        f"restart-{'aof' if aof else 'no-persistence'}",
        {
            "parked_at_crash": {"celery": 11, "rq": 11},
            "limits_after_restart": sorted(limits_after),
            "first_run_after_restart_s": env.first_run_after(restarted_at),
            "outcome": summary(outcome),
            "log": env.log_lines(*SIGNS),
            "workers_restarted": env.restarted,
        },
    )
    for o in outcome.values():
        assert o["twice"] == {}
    if aof:
        assert lost == {"celery": 0, "rq": 0}
        assert "tenant:*" in limits_after
    else:
        assert lost == {"celery": 11, "rq": 11}
        assert {i for o in outcome.values() for i in o["lost"]} == waiting
        assert limits_after == {}


# -- connections killed, code flushed ---------------------------------------------------------
def repeat_under_load(env: FaultEnv, fault: Callable[[], None], times: int, every: float) -> float:
    """Run ``fault`` ``times`` times, ``every`` seconds apart, while the load flows; the
    records clock at the last one."""
    last = 0.0
    for _ in range(times):
        fault()
        last = env.now()
        until = time.monotonic() + every  # the faults' spacing, not a synchronisation
        while time.monotonic() < until:
            time.sleep(0.05)
    return last


def test_client_kill_under_load_loses_and_doubles_nothing(
    make_env: Callable[..., FaultEnv],
) -> None:
    """``CLIENT KILL TYPE normal`` (every client connection but the killer's) five times,
    a second apart, while jobs flow: workers and producers reconnect; a call whose reply was
    lost is settled as in doubt (the gate's wire, RQ's receipts); nothing is lost or doubled.

    One thing is RQ's own: a kill that lands while an RQ worker moves a job onto its
    intermediate list or starts it makes RQ fail that job (or leave it for its abandoned-
    or stuck-job handling), as RQ does on any connection error there (``held_by_rq``). At
    most one per RQ worker per kill."""
    env = make_env()
    env.start_celery()
    env.start_rq()
    env.start_producing()
    flowing(env, 100)
    killed: list[int] = []

    def kill() -> None:
        killed.append(int(env.client.execute_command("CLIENT", "KILL", "TYPE", "normal",
                                                     "SKIPME", "yes")))  # fmt: skip

    last = repeat_under_load(env, kill, times=5, every=1.0)
    env.wait(lambda: env.now() > last + 3, timeout=30, what="3 s of load after")
    drain = settle_all(env, rq_may_hold=True)
    outcome = env.outcome()
    report(
        "client-kill-x5",
        {
            "connections_killed": killed,
            "first_run_after_last_kill_s": env.first_run_after(last),
            "caught_up_after_last_kill_s": caught_up(env, last),
            "drain_after_load_s": round(drain, 1),
            "outcome": summary(outcome),
            "log": env.log_lines(*SIGNS),
            "workers_restarted": env.restarted,
        },
    )
    assert_none_lost(outcome)
    assert sum(outcome["rq"]["held_by_rq"].values()) <= 5 * 2


def test_function_flush_under_load_reloads_the_code_and_jobs_keep_flowing(
    make_env: Callable[..., FaultEnv],
) -> None:
    """``FUNCTION FLUSH`` and ``SCRIPT FLUSH`` ten times, half a second apart, while jobs
    flow: every call that finds the code gone loads it again and is retried (the gate's
    wire resends the ordinary way); nothing lost or doubled, no worker stops."""
    env = make_env()
    env.start_celery()
    env.start_rq()
    env.start_producing()
    flowing(env, 100)

    def flush() -> None:
        env.client.function_flush()
        env.client.script_flush()

    last = repeat_under_load(env, flush, times=10, every=0.5)
    env.wait(lambda: env.now() > last + 3, timeout=30, what="3 s of load after")
    drain = settle_all(env)
    outcome = env.outcome()
    functions = env.client.function_list()
    report(
        "function-flush-x10",
        {
            "first_run_after_last_flush_s": env.first_run_after(last),
            "caught_up_after_last_flush_s": caught_up(env, last),
            "drain_after_load_s": round(drain, 1),
            "libraries_after": len(functions),
            "outcome": summary(outcome),
            "log": env.log_lines(*SIGNS),
            "workers_restarted": env.restarted,
        },
    )
    assert_none_lost(outcome)
    assert env.restarted == []


# -- a worker killed mid-dispatch -------------------------------------------------------------
def test_a_worker_killed_mid_dispatch_hands_its_jobs_back_within_the_lease(
    make_env: Callable[..., FaultEnv],
) -> None:
    """SIGKILL one Celery worker (main process and pool; ``acks_late``) and one RQ worker
    while they hold re-admitted jobs, under load (jobs of 0.1 s, so each holds some).

    Celery: the jobs it held (in flight, leased) come back when their lease runs out (5 s
    here) and another worker runs them; messages it had not acknowledged come back from the
    broker. A job that was running at the kill runs again: Celery's at-least-once with
    ``acks_late``, at most one per pool process. (Acknowledged early, each runs exactly
    once: tests/test_celery_e2e.py, ``test_no_task_lost_or_doubled_when_a_worker_is_killed``.)
    RQ: the job the worker was running is cut short and left to RQ's abandoned-job handling,
    as without us (tests/test_rq_e2e.py); nothing else is lost."""
    env = make_env(acks_late=True, job_seconds=0.1)
    # The victims work alone at first, so whatever is in flight or running is theirs.
    (celery,) = env.start_celery(1)
    (rq_worker,) = env.start_rq(1)
    env.start_producing(rq_per_second=8)  # what one RQ worker takes at 0.1 s a job
    flowing(env, 50)
    scheduler = FairScheduler(env.limiter)
    shared = env.limiter.keys.shared

    def reaped() -> int:
        return int(env.client.hget(shared, "n:reaped") or 0)

    def both_busy() -> bool:
        running = set(env.starts()) - {r.job_id for r in env.runs()}
        return scheduler.in_flight() >= 2 and any(i.startswith("r-") for i in running)

    env.wait(both_busy, timeout=30, what="jobs in flight and an RQ job running")
    before, in_flight = reaped(), scheduler.in_flight()
    killed_at = env.now()
    for victim in (celery, rq_worker):
        victim.kill()
        env.workers.remove(victim)
    env.start_celery(1)
    env.start_rq(1)
    # The first of its jobs handed back (its lease ran out); the rest come back as their
    # leases run out while settle_all waits for every job. (A lease later if no worker
    # called for half a lease while the new ones started: that is a silence, whose leases
    # are kept a lease longer for holders that may come back: lua/buckets.lua.)
    env.wait(lambda: reaped() > before, timeout=2 * LEASE + 3, what="the killed worker's jobs back")
    returned_at = env.now()
    drain = settle_all(env, timeout=60, rq_may_hold=True)
    outcome = env.outcome()
    report(
        "worker-sigkill-acks-late",
        {
            "in_flight_at_kill": in_flight,
            "reaped": reaped() - before,
            "first_return_after_kill_s": round(returned_at - killed_at, 2),
            "caught_up_after_kill_s": caught_up(env, killed_at),
            "drain_after_load_s": round(drain, 1),
            "outcome": summary(outcome),
            "log": env.log_lines(*SIGNS),
        },
    )
    assert outcome["celery"]["lost"] == []
    assert len(outcome["celery"]["twice"]) <= 2
    assert outcome["rq"]["twice"] == {}
    assert outcome["rq"]["lost"] == []
    assert sum(outcome["rq"]["held_by_rq"].values()) + outcome["rq"]["cut_short"] <= 1
    assert reaped() > before, "the killed worker's in-flight jobs came back"
