"""Fairness, caps and utilisation of ``FairScheduler`` with 8 worker processes on a real Redis.

``python -m benchmarks.fairness`` (or ``python -m benchmarks fairness``) prints one JSON object.
Each scenario gets its own namespace in a flushed database; a producer in this process keeps
the backlogs saturated while 8 worker processes call ``FairScheduler.dispatch(max_items=K)``
concurrently, ack every item at once (no-op jobs) and, when nothing is admissible, sleep for
exactly the ``wait_ms`` the scheduler returned (an idle poll only when every backlog is empty).

Timestamps are Redis's own clock: the scheduler stores each in-flight item with the score
``now + lease`` where ``now`` is the ``TIME`` its dispatch script read, so a worker reads the
scores of what it was handed (``ZMSCORE``, before acking) and subtracts the lease. Submit
times of the quiet tenants come from a ``TIME`` queued in the same ``MULTI`` as the submit.
Client clocks, process scheduling and network delays therefore play no part in the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import redis

from queue_ratelimit import Limiter
from queue_ratelimit._scheduler import FairScheduler

from ._common import (
    SCRIPT_COMMANDS,
    command_stats,
    env_float,
    log,
    machine_info,
    reset_command_stats,
    sig,
)

WORKERS = 8
MAX_ITEMS = 4  # a worker with free slots asks for up to this many items per dispatch
LANE = "jobs"
WARMUP_S = 1.0  # excluded from the rates: the buckets start full and spend their burst
TAIL_S = 0.3  # workers run this long after the measured window
TICK_S = 0.02  # producer period
IDLE_POLL_S = 0.005  # sleep when every backlog is empty (the scheduler gives no wait then)
DEFAULT_SECONDS = 10.0  # measured seconds per scenario
MIN_UTILIZATION_SECONDS = 10.0  # the utilisation figure needs T >= 10 s
CAP_WINDOWS_S = (0.01, 0.1, 1.0, 5.0)
# Every admission of one dispatch call is stamped with the TIME its script read first; the
# buckets judge each item with a TIME read later in the same script, normally microseconds
# later, but milliseconds when the Redis process is descheduled mid-script on a busy machine.
# A window of stamps may therefore hold R * (longest script) more than the bound allows; the
# longest script of each scenario comes from SLOWLOG (scripts above SLOWLOG_US), and the
# slack is never below MIN_SLACK_S.
SLOWLOG_US = 500
MIN_SLACK_S = SLOWLOG_US / 1e6
BIN_S = 0.5  # plot resolution
SCALE_TENANTS = (1, 1_000, 100_000)
SCALE_MIN_ITEMS = 40_000
SCALE_ROUNDS = 20  # short interleaved rounds: paired ratios cancel slow load changes
SCALE_SECONDS = 0.3
SCALE_STAT_CALLS = 2_000
SUBMIT_BATCH = 2_000
# The PNG goes outside the repository unless asked: $QRL_FAIRNESS_PLOT (or --plot) names
# another path, docs/fairness.png to refresh the figure in docs/benchmarks.md; empty for none.
PLOT_PATH = Path(tempfile.gettempdir()) / "qrl-bench" / "fairness.png"
DOCS_PLOT = Path(__file__).resolve().parent.parent / "docs" / "fairness.png"


# -- scenario description --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Flow:
    """One (tenant, priority) class and how its producer offers work.

    Saturating flows offer ``rate`` items per second, more than they can ever be given, plus
    a prefill of ``PREFILL_S`` seconds' worth. Quiet flows submit ``burst`` items every
    ``1 / rate`` seconds, one by one, and their submit times are recorded.
    """

    tenant: str
    priority: str = "normal"
    rate: float = 0.0
    cost: float = 1.0
    quiet: bool = False
    burst: int = 1

    @property
    def label(self) -> str:
        return f"{self.tenant}/{self.priority}"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    limits: dict[str, tuple[float, float]]  # scope -> (rate per second, burst)
    flows: tuple[Flow, ...]
    seconds: float
    weights: dict[str, float] = field(default_factory=dict)  # tenant -> weight

    @property
    def quiet_tenants(self) -> frozenset[str]:
        return frozenset(f.tenant for f in self.flows if f.quiet)


PREFILL_S = 1.5
SATURATE = 2.0  # saturating flows offer this many times what they could be given


def _scenarios(seconds: float) -> list[Scenario]:
    s6 = max(seconds, MIN_UTILIZATION_SECONDS)
    g1 = 400.0
    g3 = 1000.0
    n3 = 50
    share3 = g3 / (n3 + 5)
    quiet = (
        # (tenant, submissions per second, items per submission, own cap or None). Names
        # spread through the saturating tenants' (t00..t49) alphabetical order on purpose:
        # the scheduler breaks ties between equal passes by name.
        ("t04q", 5.0, 1, None),
        ("t17q", 2.0, 1, None),
        # 3 items at once every 2 s under its own 2/s cap (burst 1): its own bucket spaces
        # them 0.5 s apart, which is not counted as extra wait.
        ("t24q", 0.5, 3, (2.0, 1.0)),
        ("t36q", 1.0, 1, None),
        ("t49q", 5.0, 1, None),
    )
    limits3: dict[str, tuple[float, float]] = {
        "global": (g3, g3 / 10),
        "tenant:*": (100.0, 10.0),
    }
    for tenant, _, _, cap in quiet:
        if cap is not None:
            limits3[f"tenant:{tenant}"] = cap
    return [
        Scenario(
            name="priority",
            title=f"1. one tenant, high vs low (global {g1:g}/s)",
            limits={"global": (g1, g1 / 10), "tenant:*": (10_000.0, 1_000.0)},
            flows=(
                Flow("solo", "high", rate=SATURATE * g1),
                Flow("solo", "low", rate=SATURATE * g1),
            ),
            seconds=seconds,
        ),
        Scenario(
            name="work_conserving",
            title=f"2. only low has work (global {g1:g}/s)",
            limits={"global": (g1, g1 / 10), "tenant:*": (10_000.0, 1_000.0)},
            flows=(Flow("solo", "low", rate=SATURATE * g1),),
            seconds=seconds,
        ),
        Scenario(
            name="tenants",
            title=f"3. {n3} tenants (t00 offers 10x) + 5 quiet (global {g3:g}/s)",
            limits=limits3,
            flows=(
                Flow("t00", rate=10 * SATURATE * share3),
                *(Flow(f"t{i:02d}", rate=SATURATE * share3) for i in range(1, n3)),
                *(Flow(t, rate=r, quiet=True, burst=b) for t, r, b, _ in quiet),
            ),
            seconds=seconds,
        ),
        Scenario(
            name="premium",
            title=f"4. weight-5 tenant vs four weight-1 (global {g1:g}/s)",
            limits={"global": (g1, g1 / 10), "tenant:*": (10_000.0, 1_000.0)},
            flows=(
                Flow("premium", rate=SATURATE * g1 * 5 / 9),
                *(Flow(f"std{i}", rate=SATURATE * g1 / 9) for i in range(1, 5)),
            ),
            weights={"premium": 5.0},
            seconds=seconds,
        ),
        Scenario(
            name="utilization",
            title="6. tenant caps binding (global 2000/s not binding)",
            limits={
                "global": (2000.0, 200.0),
                "tenant:*": (120.0, 12.0),
                "tenant:u-b": (60.0, 6.0),
                "tenant:u-c": (100.0, 10.0),
                "tenant:u-d": (1000.0, 100.0),
                f"tenant:u-d:queue:{LANE}": (80.0, 8.0),
            },
            flows=(
                Flow("u-a", "high", rate=SATURATE * 120),
                Flow("u-a", "low", rate=SATURATE * 120),
                Flow("u-b", rate=SATURATE * 60),
                Flow("u-c", rate=SATURATE * 50, cost=2.0),
                Flow("u-d", rate=SATURATE * 80),
            ),
            seconds=s6,
        ),
    ]


# -- Redis helpers ---------------------------------------------------------------------------
def _redis_ms(reply: Sequence[int]) -> float:
    return int(reply[0]) * 1000.0 + int(reply[1]) / 1000.0


def _queue_submit(pipe: Any, scheduler: FairScheduler, item_id: str, flow: Flow) -> None:
    """``FairScheduler.submit``, queued on a pipeline."""
    scheduler.submit(
        flow.tenant,
        item_id,
        queue=LANE,
        priority=flow.priority,
        cost=float(flow.cost),
        pipeline=pipe,
    )


def _check_submitted(replies: Iterable[object]) -> None:
    bad = [r for r in replies if r != 1]
    if bad:
        raise RuntimeError(f"submit refused: {bad[:5]}")


def _configure(limiter: Limiter, scheduler: FairScheduler, scenario: Scenario) -> None:
    from queue_ratelimit import Limit

    for scope, (rate, burst) in scenario.limits.items():
        limiter.set_limit(scope, Limit(rate, burst=burst))
    for tenant, weight in scenario.weights.items():
        scheduler.set_tenant_weight(tenant, weight)


# -- workers ---------------------------------------------------------------------------------
@dataclass(slots=True)
class WorkerResult:
    admitted: list[tuple[float, str, str, float]]  # (redis ms, tenant, priority, cost)
    quiet: list[tuple[str, float]]  # (item id, redis ms) of quiet tenants' items
    calls: int = 0
    empty_calls: int = 0
    zero_wait_empty: int = 0
    idle_polls: int = 0
    slept_s: float = 0.0
    ack_failures: int = 0
    pid: int = 0


_POOL: dict[str, Any] = {}


def _init_pool(barrier: Any) -> None:
    _POOL["barrier"] = barrier


def _warm(_: int) -> int:
    """Hold every pool process at a barrier, so that all of them are started and warm."""
    _POOL["barrier"].wait(timeout=120)
    return os.getpid()


def _worker(
    url: str, namespace: str, stop_at: float, quiet: frozenset[str], max_items: int
) -> WorkerResult:
    """Dispatch and ack until ``stop_at`` (wall clock), recording every admission."""
    limiter = Limiter.from_url(url, namespace=namespace)
    scheduler = FairScheduler(limiter)
    client = limiter.client
    inflight = limiter.keys.inflight
    lease = scheduler.lease_ms
    result = WorkerResult(admitted=[], quiet=[], pid=os.getpid())
    try:
        while True:
            now = time.time()
            if now >= stop_at:
                break
            batch = scheduler.dispatch([LANE], max_items=max_items, with_payload=False)
            result.calls += 1
            if batch.items:
                ids = [item.id for item in batch.items]
                # The lease deadline is the script's TIME + lease: Redis's clock, exactly.
                scores = client.zmscore(inflight, ids)
                for item, score in zip(batch.items, scores, strict=True):
                    if score is None:
                        raise RuntimeError(f"dispatched item {item.id} is not in flight")
                    t = float(score) - lease
                    result.admitted.append((t, item.tenant, item.priority, item.cost))
                    if item.tenant in quiet:
                        result.quiet.append((item.id, t))
                for item_id in ids:
                    if not scheduler.ack(item_id):
                        result.ack_failures += 1
                continue
            result.empty_calls += 1
            if batch.wait_ms is None:
                result.idle_polls += 1
                pause = IDLE_POLL_S
            elif batch.wait_ms > 0:
                pause = batch.wait_ms / 1000.0
            else:
                # "Something may be dispatchable now" (e.g. tenants were parked): ask again.
                result.zero_wait_empty += 1
                continue
            pause = min(pause, max(0.0, stop_at - now))
            result.slept_s += pause
            time.sleep(pause)
    finally:
        limiter.close()
    return result


# -- producer --------------------------------------------------------------------------------
@dataclass(slots=True)
class Produced:
    submitted: dict[str, int]  # flow label -> items
    quiet_submit_ms: dict[str, float]  # item id -> redis ms
    quiet_tenant_of: dict[str, str]  # item id -> tenant
    late_ticks: int = 0


def _prefill(admin: redis.Redis, scheduler: FairScheduler, scenario: Scenario) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    pipe = admin.pipeline(transaction=False)
    queued = 0
    for index, flow in enumerate(scenario.flows):
        if flow.quiet:
            continue
        for seq in range(math.ceil(flow.rate * PREFILL_S)):
            _queue_submit(pipe, scheduler, f"f{index}-p{seq}", flow)
            counts[flow.label] += 1
            queued += 1
            if queued % SUBMIT_BATCH == 0:
                _check_submitted(pipe.execute())
    _check_submitted(pipe.execute())
    return dict(counts)


def _produce(
    admin: redis.Redis,
    scheduler: FairScheduler,
    scenario: Scenario,
    stop_at: float,
    submitted: dict[str, int],
    rng: random.Random,
) -> Produced:
    """Offer each flow's work at its rate until ``stop_at`` (wall clock)."""
    produced = Produced(submitted=submitted, quiet_submit_ms={}, quiet_tenant_of={})
    steady = [(i, f) for i, f in enumerate(scenario.flows) if not f.quiet]
    quiet = [(i, f) for i, f in enumerate(scenario.flows) if f.quiet]
    owed = dict.fromkeys(range(len(scenario.flows)), 0.0)
    seq: dict[int, int] = defaultdict(int)
    start = time.time()
    # Quiet flows: a steady period with a random phase, so that they do not line up.
    next_quiet = {i: start + rng.uniform(0, 1 / f.rate) for i, f in quiet}
    last = start
    tick = start
    while True:
        now = time.time()
        if now >= stop_at:
            break
        pipe = admin.pipeline(transaction=False)
        for i, flow in steady:
            owed[i] += flow.rate * (now - last)
            n = int(owed[i])
            owed[i] -= n
            for _ in range(n):
                _queue_submit(pipe, scheduler, f"f{i}-{seq[i]}", flow)
                seq[i] += 1
            submitted[flow.label] = submitted.get(flow.label, 0) + n
        if len(pipe):
            _check_submitted(pipe.execute())
        last = now
        for i, flow in quiet:
            while next_quiet[i] <= now:
                for _ in range(flow.burst):
                    item_id = f"q{i}-{seq[i]}"
                    seq[i] += 1
                    tx = admin.pipeline(transaction=True)
                    tx.time()
                    _queue_submit(tx, scheduler, item_id, flow)
                    t_reply, ok = tx.execute()
                    _check_submitted([ok])
                    produced.quiet_submit_ms[item_id] = _redis_ms(t_reply)
                    produced.quiet_tenant_of[item_id] = flow.tenant
                    submitted[flow.label] = submitted.get(flow.label, 0) + 1
                next_quiet[i] += 1 / flow.rate
        tick += TICK_S
        pause = tick - time.time()
        if pause > 0:
            time.sleep(min(pause, max(0.0, stop_at - time.time())))
        else:
            produced.late_ticks += 1
            tick = time.time()
    return produced


# -- analysis --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Bucket:
    scope: str
    rate: float
    burst: float
    tenant: str | None  # None: every tenant (global or queue buckets)


def _buckets(scenario: Scenario, tenants: Iterable[str]) -> list[Bucket]:
    """Every bucket the scenario's limits create, with the items it charges."""
    out = []
    explicit = {s.split(":", 1)[1] for s in scenario.limits if s.count(":") == 1}
    for scope, (rate, burst) in scenario.limits.items():
        if scope in ("global", f"queue:{LANE}"):
            out.append(Bucket(scope, rate, burst, None))
        elif scope == "tenant:*":
            out.extend(
                Bucket(f"tenant:{t}", rate, burst, t) for t in sorted(tenants) if t not in explicit
            )
        elif scope.startswith("tenant:*:queue:"):
            out.extend(Bucket(f"tenant:{t}:queue:{LANE}", rate, burst, t) for t in sorted(tenants))
        elif scope.startswith("tenant:"):
            out.append(Bucket(scope, rate, burst, scope.split(":")[1]))
    return out


def _cap_check(
    times_s: Any, costs: Any, bucket: Bucket, windows: Sequence[float], slack_s: float
) -> dict[str, Any]:
    """Windows ``[t_i, t_i + T]`` (one per distinct admission time) holding more than
    ``R * T + B`` (plus the script slack), the fullest window relative to that bound, and a
    replay of the admissions through the bucket (all window lengths at once)."""
    import numpy as np

    out: dict[str, Any] = {"rate": bucket.rate, "burst": bucket.burst, "windows": {}}
    total = 0
    if len(times_s) == 0:
        return {**out, "violations": 0}
    cum = np.concatenate(([0.0], np.cumsum(costs)))
    starts = np.searchsorted(times_s, times_s, side="left")
    first = np.unique(starts)
    for window in windows:
        ends = np.searchsorted(times_s, times_s[first] + window, side="right")
        admitted = cum[ends] - cum[first]
        bound = bucket.rate * window + bucket.burst
        limit = bucket.rate * (window + slack_s) + bucket.burst + 1e-6
        violations = int(np.count_nonzero(admitted > limit))
        total += violations
        out["windows"][f"{window:g}s"] = {
            "bound": sig(bound),
            "max_admitted": sig(float(admitted.max())),
            "max_fill": sig(float(admitted.max()) / bound),
            "violations": violations,
            "over_bound_without_slack": int(np.count_nonzero(admitted > bound + 1e-6)),
        }
    # Replaying the admissions through the bucket (starting full) checks every window length
    # at once: its level stays >= 0 exactly when no interval admitted more than R * T + B.
    level, last, lowest, replay_violations = bucket.burst, 0.0, bucket.burst, 0
    floor = -bucket.rate * slack_s - 1e-6
    for t, cost in zip(times_s.tolist(), costs.tolist(), strict=True):
        level = min(bucket.burst, level + (t - last) * bucket.rate) - cost
        last = t
        lowest = min(lowest, level)
        if level < floor:
            replay_violations += 1
    out["replay_min_tokens"] = sig(lowest)
    out["replay_violations"] = replay_violations
    out["violations"] = total + replay_violations
    return out


def _own_ready_times(
    submits: Sequence[float],
    admits: Sequence[float],
    costs: Sequence[float],
    buckets: Sequence[tuple[float, float]],
) -> list[float]:
    """When each of a tenant's items (FIFO, times in ms) became admissible by its own buckets.

    That is the latest of its submit time, the previous item's dispatch and the moment its
    own buckets, as really debited by the earlier dispatches, hold its cost. ``buckets`` are
    (rate per ms, burst) and start full, like a tenant that has never been seen.
    """
    tokens = [burst for _, burst in buckets]
    at = [-math.inf for _ in buckets]  # when each bucket was last debited

    def level(j: int, t: float) -> float:
        rate, burst = buckets[j]
        return burst if at[j] == -math.inf else min(burst, tokens[j] + (t - at[j]) * rate)

    out: list[float] = []
    previous = -math.inf
    for submit, admit, cost in zip(submits, admits, costs, strict=True):
        ready = max(submit, previous)
        for j, (rate, _) in enumerate(buckets):
            short = cost - level(j, ready)
            if short > 0:
                ready += short / rate  # levels only grow with time: earlier checks still hold
        out.append(ready)
        for j in range(len(buckets)):
            tokens[j] = level(j, admit) - cost
            at[j] = admit
        previous = admit
    return out


def _jain(values: Sequence[float]) -> float:
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 0.0


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(slots=True)
class ScenarioRun:
    scenario: Scenario
    t0_ms: float
    admitted: list[tuple[float, str, str, float]]
    quiet_admit_ms: dict[str, float]
    produced: Produced
    workers: list[WorkerResult]
    wall_s: float
    slow_scripts_us: list[int]  # durations of the scripts slower than SLOWLOG_US

    @property
    def slack_s(self) -> float:
        """The most a stamp can precede its bucket decision: the longest script."""
        return max([MIN_SLACK_S, *(us / 1e6 for us in self.slow_scripts_us)])

    @property
    def window(self) -> tuple[float, float]:
        start = self.t0_ms + WARMUP_S * 1000
        return start, start + self.scenario.seconds * 1000


class _SlowLog:
    """Records the scripts slower than SLOWLOG_US during a scenario (settings restored)."""

    def __init__(self, admin: redis.Redis) -> None:
        self.admin = admin
        self.saved = admin.config_get("slowlog-*")
        admin.config_set("slowlog-log-slower-than", SLOWLOG_US)
        admin.config_set("slowlog-max-len", 100_000)
        admin.slowlog_reset()

    def scripts_us(self) -> list[int]:
        entries: Any = self.admin.slowlog_get(100_000)
        for name, value in self.saved.items():  # type: ignore[union-attr]
            self.admin.config_set(name, value)
        out = []
        for entry in entries:
            command = entry["command"]
            text = command.decode() if isinstance(command, bytes) else str(command)
            if text.split(" ", 1)[0].lower() in SCRIPT_COMMANDS:
                out.append(int(entry["duration"]))
        return out


def _run_scenario(
    pool: ProcessPoolExecutor, url: str, admin: redis.Redis, scenario: Scenario, seed: int
) -> ScenarioRun:
    admin.flushdb()
    namespace = f"fair-{scenario.name}"
    limiter = Limiter(admin, namespace=namespace)
    scheduler = FairScheduler(limiter)
    _configure(limiter, scheduler, scenario)
    submitted = _prefill(admin, scheduler, scenario)
    quiet = scenario.quiet_tenants
    slowlog = _SlowLog(admin)
    try:
        t0_ms = _redis_ms(admin.time())  # type: ignore[arg-type]
        started = time.time()
        stop_at = started + WARMUP_S + scenario.seconds + TAIL_S
        futures = [
            pool.submit(_worker, url, namespace, stop_at, quiet, MAX_ITEMS) for _ in range(WORKERS)
        ]
        produced = _produce(admin, scheduler, scenario, stop_at, submitted, random.Random(seed))
        workers = [f.result() for f in futures]
        wall = time.time() - started
    finally:
        slow = slowlog.scripts_us()  # also puts the server's slowlog settings back
    admitted = sorted(a for w in workers for a in w.admitted)
    quiet_admit = {item_id: t for w in workers for item_id, t in w.quiet}
    return ScenarioRun(scenario, t0_ms, admitted, quiet_admit, produced, workers, wall, slow)


def _by_class(run: ScenarioRun) -> dict[str, dict[str, float]]:
    """Items and cost admitted per class inside the measured window."""
    lo, hi = run.window
    out: dict[str, dict[str, float]] = {}
    for t, tenant, priority, cost in run.admitted:
        if lo <= t < hi:
            entry = out.setdefault(f"{tenant}/{priority}", {"items": 0, "cost": 0.0})
            entry["items"] += 1
            entry["cost"] += cost
    return out


def _by_tenant(classes: dict[str, dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for label, entry in classes.items():
        out[label.split("/")[0]] += entry["cost"]
    return dict(out)


def _worker_stats(run: ScenarioRun) -> dict[str, Any]:
    ws = run.workers
    calls = sum(w.calls for w in ws)
    items = sum(len(w.admitted) for w in ws)
    return {
        "worker_processes": len({w.pid for w in ws}),
        "dispatch_calls": calls,
        "items_per_call": sig(items / calls) if calls else 0,
        "empty_calls": sum(w.empty_calls for w in ws),
        "empty_calls_with_zero_wait": sum(w.zero_wait_empty for w in ws),
        "idle_polls": sum(w.idle_polls for w in ws),
        "slept_fraction": sig(sum(w.slept_s for w in ws) / (len(ws) * run.wall_s)),
        "ack_failures": sum(w.ack_failures for w in ws),
        "producer_late_ticks": run.produced.late_ticks,
    }


def _caps(run: ScenarioRun) -> dict[str, Any]:
    import numpy as np

    tenants = {a[1] for a in run.admitted} | {f.tenant for f in run.scenario.flows}
    out = {}
    for bucket in _buckets(run.scenario, tenants):
        rows = [a for a in run.admitted if bucket.tenant is None or a[1] == bucket.tenant]
        times = np.array([(a[0] - run.t0_ms) / 1000.0 for a in rows])
        costs = np.array([a[3] for a in rows])
        out[bucket.scope] = _cap_check(times, costs, bucket, CAP_WINDOWS_S, run.slack_s)
    return out


def _utilization(run: ScenarioRun, buckets: Sequence[Bucket]) -> dict[str, float]:
    lo, hi = run.window
    seconds = (hi - lo) / 1000
    out = {}
    for b in buckets:
        spent = sum(
            a[3] for a in run.admitted if lo <= a[0] < hi and (b.tenant is None or a[1] == b.tenant)
        )
        out[b.scope] = sig(spent / (b.rate * seconds))
    return out


def _binding(scenario: Scenario) -> list[Bucket]:
    """The buckets offered more than their rate: those that must be used to the full."""
    out = []
    for b in _buckets(scenario, {f.tenant for f in scenario.flows}):
        offered = sum(f.rate * f.cost for f in scenario.flows if b.tenant in (None, f.tenant))
        if offered > b.rate:
            out.append(b)
    return out


def _series(
    run: ScenarioRun, key: Callable[[str, str], str | None], bin_s: float = BIN_S
) -> dict[str, list[float]]:
    """Admitted cost per second in ``bin_s`` bins from the scenario start, per plotted class."""
    duration = WARMUP_S + run.scenario.seconds + TAIL_S
    bins = int(duration / bin_s)  # whole bins only: the last partial one would read low
    out: dict[str, list[float]] = {}
    for t, tenant, priority, cost in run.admitted:
        name = key(tenant, priority)
        if name is None:
            continue
        index = int((t - run.t0_ms) / 1000 / bin_s)
        if 0 <= index < bins:
            out.setdefault(name, [0.0] * bins)[index] += cost / bin_s
    return out


def _quiet_waits(run: ScenarioRun) -> dict[str, Any]:
    """Submit-to-dispatch latency of the quiet tenants minus what their own buckets require."""
    scenario = run.scenario
    produced = run.produced
    flows = {f.tenant: f for f in scenario.flows if f.quiet}
    per_tenant: dict[str, dict[str, Any]] = {}
    extras: list[float] = []
    undispatched = 0
    lo, hi = run.window
    for tenant, flow in sorted(flows.items()):
        ids = sorted(
            (i for i, t in produced.quiet_tenant_of.items() if t == tenant),
            key=lambda i: produced.quiet_submit_ms[i],
        )
        own = [
            scenario.limits.get(f"tenant:{tenant}", scenario.limits.get("tenant:*")),
            scenario.limits.get(
                f"tenant:{tenant}:queue:{LANE}", scenario.limits.get(f"tenant:*:queue:{LANE}")
            ),
        ]
        own_buckets = [(rate / 1000.0, burst) for rate, burst in (b for b in own if b)]
        submits = [produced.quiet_submit_ms[i] for i in ids]
        admits = [run.quiet_admit_ms.get(i) for i in ids]
        done = next((n for n, a in enumerate(admits) if a is None), len(ids))
        undispatched += sum(1 for s in submits[done:] if s < hi - 500)
        dispatched = [a for a in admits[:done] if a is not None]
        ready = _own_ready_times(submits[:done], dispatched, [flow.cost] * done, own_buckets)
        latency, required, extra = [], [], []
        for submit, admit, earliest in zip(submits, dispatched, ready, strict=False):
            if lo <= submit < hi:
                latency.append(admit - submit)
                required.append(earliest - submit)
                extra.append(admit - earliest)
        extras.extend(extra)
        # Saturating tenants whose names sort before this one: at equal passes the active
        # set (a sorted set) serves them first, so they bound the wait: ahead * cost / cap.
        ahead = sum(1 for f in scenario.flows if not f.quiet and f.tenant < tenant)
        per_tenant[tenant] = {
            "items": len(extra),
            "saturating_tenants_sorting_before": ahead,
            "ahead_bound_ms": sig(1000 * ahead * flow.cost / scenario.limits["global"][0]),
            "latency_p50_ms": sig(_percentile(latency, 50)),
            "latency_p99_ms": sig(_percentile(latency, 99)),
            "own_buckets_require_p99_ms": sig(_percentile(required, 99)),
            "extra_wait_p50_ms": sig(_percentile(extra, 50)),
            "extra_wait_p99_ms": sig(_percentile(extra, 99)),
            "extra_wait_max_ms": sig(max(extra)) if extra else None,
        }
    return {
        "p50_ms": sig(_percentile(extras, 50)),
        "p99_ms": sig(_percentile(extras, 99)),
        "max_ms": sig(max(extras)) if extras else None,
        "items": len(extras),
        "undispatched": undispatched,
        "per_tenant": per_tenant,
    }


def _analyse(run: ScenarioRun) -> dict[str, Any]:
    scenario = run.scenario
    classes = _by_class(run)
    seconds = scenario.seconds
    tenants = {f.tenant for f in scenario.flows}
    result: dict[str, Any] = {
        "title": scenario.title,
        "measured_seconds": seconds,
        "limits": {s: {"rate": r, "burst": b} for s, (r, b) in scenario.limits.items()},
        "weights": scenario.weights,
        "admitted_per_s": {k: sig(v["cost"] / seconds) for k, v in sorted(classes.items())},
        "submitted": dict(sorted(run.produced.submitted.items())),
        "workers": _worker_stats(run),
        "caps": _caps(run),
    }
    result["cap_violations"] = sum(c["violations"] for c in result["caps"].values())
    result["cap_slack_ms"] = sig(run.slack_s * 1000)
    result["scripts_slower_than_ms"] = {
        f"{SLOWLOG_US / 1000:g}": len(run.slow_scripts_us),
        "longest": sig(max(run.slow_scripts_us, default=0) / 1000),
    }
    buckets = _buckets(scenario, tenants)
    if scenario.name in ("priority", "work_conserving", "premium", "tenants"):
        result["global_utilization"] = _utilization(
            run, [b for b in buckets if b.scope == "global"]
        )["global"]
    return result


# -- the scale scenario (7) ------------------------------------------------------------------
def _scale(url: str, admin: redis.Redis) -> dict[str, Any]:
    """Dispatch + ack throughput, one process, with 1 / 1,000 / 100,000 backlogged tenants."""
    from queue_ratelimit import Limit

    admin.flushdb()
    setups: dict[int, FairScheduler] = {}
    setup_s: dict[str, float] = {}
    first_service: dict[str, float] = {}
    for tenants in SCALE_TENANTS:
        limiter = Limiter.from_url(url, namespace=f"scale-{tenants}")
        limiter.set_limit("global", Limit(1e8, burst=1e8))
        limiter.set_limit("tenant:*", Limit(1e6, burst=1e6))
        scheduler = FairScheduler(limiter)
        per_tenant = max(1, math.ceil(SCALE_MIN_ITEMS / tenants))
        names = [f"s{t:06d}" for t in range(tenants)]
        started = time.perf_counter()
        pipe = admin.pipeline(transaction=False)
        for seq in range(per_tenant):
            for tenant in names:
                _queue_submit(pipe, scheduler, f"{tenant}-{seq}", Flow(tenant))
                if len(pipe) >= SUBMIT_BATCH:
                    _check_submitted(pipe.execute())
        _check_submitted(pipe.execute())
        if tenants == SCALE_TENANTS[-1]:
            # Serving a tenant for the first time creates its hash (buckets, counters): the
            # cost of the first pass over many new tenants, measured before they are warmed.
            dispatch_us, ack_us = _server_us(admin, scheduler)
            first_service = {"dispatch_us": dispatch_us, "ack_us": ack_us}
        # Steady state: every backlogged tenant has been served within the counter retention
        # (900 s), so its hash exists. One acquire per tenant creates it, as a dispatch would.
        for tenant in names:
            call = limiter._core.decision_call("acquire", tenant, LANE, None, 1)
            limiter._scripts.queue(pipe, "acquire.lua", call.keys, call.args)
            if len(pipe) >= SUBMIT_BATCH:
                pipe.execute()
        pipe.execute()
        setup_s[str(tenants)] = sig(time.perf_counter() - started, 3)
        log(
            f"  scale: {tenants:,} tenants x {per_tenant} items set up in {setup_s[str(tenants)]} s"
        )
        setups[tenants] = scheduler

    def loop(scheduler: FairScheduler, seconds: float) -> tuple[int, float, bool]:
        count = 0
        ran_dry = False
        clock = time.perf_counter
        start = clock()
        deadline = start + seconds
        while True:
            for _ in range(25):
                batch = scheduler.dispatch([LANE], max_items=1, with_payload=False)
                if not batch.items:
                    ran_dry = True
                    break
                scheduler.ack(batch.items[0].id)
                count += 1
            now = clock()
            if ran_dry or now >= deadline:
                return count, now - start, ran_dry

    for scheduler in setups.values():
        loop(scheduler, 0.2)  # warm up: connections, script cache
    rates: dict[int, list[float]] = {t: [] for t in SCALE_TENANTS}
    dry = False
    for r in range(SCALE_ROUNDS):
        order = SCALE_TENANTS[r % len(SCALE_TENANTS) :] + SCALE_TENANTS[: r % len(SCALE_TENANTS)]
        for tenants in order:
            count, seconds, ran_dry = loop(setups[tenants], SCALE_SECONDS)
            dry = dry or ran_dry
            rates[tenants].append(count / seconds)
        if r % 5 == 4:
            log(
                f"  scale: round {r + 1}: "
                + ", ".join(f"{t:,} tenants {rates[t][-1]:,.0f} ops/s" for t in SCALE_TENANTS)
            )

    # Server time per script call: dispatches alone, then acks alone, then plain acquires.
    server: dict[str, Any] = {}
    for tenants, scheduler in setups.items():
        dispatch_us, ack_us = _server_us(admin, scheduler)
        server[str(tenants)] = {"dispatch_us": dispatch_us, "ack_us": ack_us}
    limiter = Limiter.from_url(url, namespace="scale-acquire")
    limiter.set_limit("global", Limit(1e8, burst=1e8))
    limiter.set_limit("tenant:*", Limit(1e6, burst=1e6))
    for _ in range(200):
        limiter.acquire("s000000", queue=LANE)
    reset_command_stats(admin)
    for _ in range(SCALE_STAT_CALLS):
        limiter.acquire("s000000", queue=LANE)
    acquire_us = _script_us(admin)
    limiter.close()
    for scheduler in setups.values():
        scheduler.limiter.close()

    medians = {t: statistics.median(v) for t, v in rates.items()}
    one = rates[SCALE_TENANTS[0]]
    ratios = {
        t: statistics.median(a / b for a, b in zip(v, one, strict=True)) for t, v in rates.items()
    }
    return {
        "dispatch_ops_per_s": {str(t): round(v) for t, v in medians.items()},
        "dispatch_ops_per_s_rounds": {str(t): [round(x) for x in v] for t, v in rates.items()},
        # Median over rounds of the ratio within each round (the cases run back to back).
        "ratio_to_1_tenant": {str(t): sig(v) for t, v in ratios.items()},
        # The same ratio from server time alone (dispatch + ack), immune to client noise.
        "server_ratio_to_1_tenant": {
            t: sig(
                (server[one]["dispatch_us"] + server[one]["ack_us"])
                / (s["dispatch_us"] + s["ack_us"])
            )
            for one in [str(SCALE_TENANTS[0])]
            for t, s in server.items()
        },
        "server_us_per_call": {
            **server,
            "acquire_us": acquire_us,
            "dispatch_vs_acquire": {
                t: sig(s["dispatch_us"] / acquire_us) for t, s in server.items()
            },
        },
        "first_service_server_us_100000": first_service,
        "setup_seconds": setup_s,
        "backlog_ran_dry": dry,
        "notes": "op = dispatch(max_items=1) + ack, sequential, one process; limits global "
        "1e8/s and tenant:* 1e6/s never bind; every tenant's hash exists (served before, as "
        "in steady state); server us from INFO commandstats (fcall): "
        f"{SCALE_STAT_CALLS} dispatches, then their acks, then as many Limiter.acquire "
        "(tenant + queue, the same two buckets) calls",
    }


def _server_us(admin: redis.Redis, scheduler: FairScheduler) -> tuple[float, float]:
    """Server microseconds per dispatch call, then per ack call, over SCALE_STAT_CALLS."""
    reset_command_stats(admin)
    ids: list[str] = []
    for _ in range(SCALE_STAT_CALLS):
        batch = scheduler.dispatch([LANE], max_items=1, with_payload=False)
        ids.extend(i.id for i in batch.items)
    dispatch_us = _script_us(admin)
    reset_command_stats(admin)
    for item_id in ids:
        scheduler.ack(item_id)
    return dispatch_us, _script_us(admin)


def _script_us(admin: redis.Redis) -> float:
    """Server microseconds per call of our scripts (FCALL, or EVALSHA without Functions)."""
    stats = command_stats(admin)
    calls = sum(stats[c].calls for c in ("fcall", "evalsha") if c in stats)
    if calls == 0:
        return math.nan
    return sig(sum(stats[c].usec for c in ("fcall", "evalsha") if c in stats) / calls, 3)


# -- entry points ----------------------------------------------------------------------------
def _target_range(value: float, goal: float, tolerance: float) -> dict[str, Any]:
    return {
        "value": value,
        "bound": f"{goal:g} +/- {tolerance:.0%}",
        "met": abs(value - goal) <= goal * tolerance,
    }


def _target_min(value: float, bound: float) -> dict[str, Any]:
    return {"value": value, "bound": f">= {bound:g}", "met": value >= bound}


def _target_max(value: float, bound: float) -> dict[str, Any]:
    return {"value": value, "bound": f"<= {bound:g}", "met": value <= bound}


def _default_plot() -> Path | None:
    raw = os.environ.get("QRL_FAIRNESS_PLOT")
    if raw is None:
        return PLOT_PATH
    return Path(raw) if raw else None


def run(redis_url: str, seconds: float | None = None, plot: Path | None = None) -> dict[str, Any]:
    """Run every scenario and return the figures.

    Args:
        redis_url: a server the benchmark may flush.
        seconds: measured seconds per scenario; default ``$QRL_FAIRNESS_SECONDS``, then
            ``$QRL_BENCH_SECONDS``, then 10 (the utilisation scenario measures at least 10).
        plot: where to write the PNG; default ``$QRL_FAIRNESS_PLOT``, else a file in the
            temporary folder (never the tracked docs/fairness.png unless named).
    """
    plot = plot or _default_plot()
    if seconds is None:
        seconds = env_float("QRL_FAIRNESS_SECONDS", env_float("QRL_BENCH_SECONDS", DEFAULT_SECONDS))
    admin = redis.Redis.from_url(redis_url)
    scenarios = _scenarios(seconds)
    runs: dict[str, ScenarioRun] = {}
    details: dict[str, Any] = {}
    started = time.perf_counter()
    context = get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=WORKERS,
        mp_context=context,
        initializer=_init_pool,
        initargs=(context.Barrier(WORKERS),),
    ) as pool:
        pids = set(pool.map(_warm, range(WORKERS)))
        log(f"fairness: {len(pids)} worker processes, {seconds:g} s measured per scenario")
        for index, scenario in enumerate(scenarios):
            run_ = _run_scenario(pool, redis_url, admin, scenario, seed=index)
            runs[scenario.name] = run_
            details[scenario.name] = _analyse(run_)
            log(
                f"  {scenario.name}: {len(run_.admitted):,} admitted in {run_.wall_s:.1f} s, "
                f"cap violations {details[scenario.name]['cap_violations']}"
            )
    log("  scale (7): one process")
    scale = _scale(redis_url, admin)
    admin.flushdb()

    prio = details["priority"]["admitted_per_s"]
    priority_ratio = sig(prio["solo/high"] / prio["solo/low"])
    wc = runs["work_conserving"]
    work_conserving = _utilization(wc, _buckets(wc.scenario, {"solo"}))["global"]
    ten = runs["tenants"]
    rates = _by_tenant(_by_class(ten))
    saturating = [rates.get(f.tenant, 0.0) for f in ten.scenario.flows if not f.quiet]
    jain = sig(_jain(saturating), 6)
    quiet = _quiet_waits(ten)
    details["tenants"]["jain_rates_per_s"] = {
        "min": sig(min(saturating) / seconds),
        "max": sig(max(saturating) / seconds),
        "t00": sig(rates.get("t00", 0.0) / seconds),
    }
    details["tenants"]["quiet"] = quiet
    details["tenants"]["round_ms"] = sig(
        1000 * sum(1 for f in ten.scenario.flows if not f.quiet) / ten.scenario.limits["global"][0]
    )
    prem = _by_tenant(_by_class(runs["premium"]))
    standard = [prem.get(f"std{i}", 0.0) for i in range(1, 5)]
    premium_ratio = sig(prem.get("premium", 0.0) / statistics.mean(standard))
    ut = runs["utilization"]
    per_bucket = _utilization(ut, _binding(ut.scenario))
    details["utilization"]["binding_buckets"] = per_bucket
    utilization = min(per_bucket.values())
    cap_violations = sum(d["cap_violations"] for d in details.values())
    targets = {
        "priority_ratio": _target_range(priority_ratio, 3.0, 0.05),
        "work_conserving_utilization": _target_min(work_conserving, 0.97),
        "tenant_jain_index": _target_min(jain, 0.99),
        "quiet_tenant_p99_wait_ms": _target_max(quiet["p99_ms"], 50.0),
        "premium_ratio": _target_range(premium_ratio, 5.0, 0.05),
        "cap_violations": _target_max(cap_violations, 0),
        "utilization": _target_min(utilization, 0.97),
        "dispatch_ops_ratio_100000": _target_min(scale["ratio_to_1_tenant"]["100000"], 0.8),
    }
    result: dict[str, Any] = {
        "priority_ratio": priority_ratio,
        "work_conserving_utilization": work_conserving,
        "tenant_jain_index": jain,
        "quiet_tenant_p99_wait_ms": quiet["p99_ms"],
        "premium_ratio": premium_ratio,
        "cap_violations": cap_violations,
        "utilization": utilization,
        "dispatch_ops_per_s": scale["dispatch_ops_per_s"],
        "dispatch_ops_ratio": scale["ratio_to_1_tenant"],
        "server_us_per_call": scale["server_us_per_call"],
        "targets": targets,
        "all_targets_met": all(t["met"] for t in targets.values()),
        "settings": {
            "workers": WORKERS,
            "max_items_per_dispatch": MAX_ITEMS,
            "measured_seconds_per_scenario": seconds,
            "warmup_seconds": WARMUP_S,
            "cap_windows_s": list(CAP_WINDOWS_S),
            "cap_slack": "R * longest script of the scenario (SLOWLOG), at least "
            f"{MIN_SLACK_S * 1000:g} ms: how much a stamp can precede its bucket decision",
            "timestamps": "Redis TIME read by the dispatch script (in-flight score - lease)",
            "total_seconds": sig(time.perf_counter() - started, 3),
        },
        "machine": machine_info(admin),
        "scenarios": details,
        "scale": scale,
    }
    if plot is not None:
        from ._fairness_plot import plot_runs

        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_runs(runs, scale, plot)
        result["plot"] = str(plot)
    admin.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fairness",
        description="FairScheduler fairness, caps and utilisation; one JSON object on stdout.",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="default: $REDIS_URL"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="measured seconds per scenario (default $QRL_FAIRNESS_SECONDS, "
        "$QRL_BENCH_SECONDS or 10; the utilisation scenario runs at least 10)",
    )
    parser.add_argument(
        "--plot",
        help=f"PNG path (default $QRL_FAIRNESS_PLOT or {PLOT_PATH}; '' for none; "
        f"{DOCS_PLOT.relative_to(DOCS_PLOT.parent.parent)} refreshes the documented figure)",
    )
    args = parser.parse_args(argv)
    if not args.redis_url:
        parser.error("no Redis: pass --redis-url or set REDIS_URL")
    if args.plot is not None:
        os.environ["QRL_FAIRNESS_PLOT"] = args.plot
    result = run(args.redis_url, args.seconds)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    # Re-import under the package name so the worker processes find ``_worker`` by its
    # module path rather than as ``__main__._worker``.
    import importlib

    sys.exit(importlib.import_module("benchmarks.fairness").main())
