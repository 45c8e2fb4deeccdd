"""Decision throughput and server cost: our ``acquire`` against the floor and other libraries.

Every case makes decisions back to back from this one Python process, with its own redis-py
client made with the same settings (``redis.Redis.from_url`` defaults, or the library's own
equivalent), on the same Redis server, in the same run:

- ``floor``: ``EVALSHA`` of ``return 1`` (one round trip and nothing else);
- ``floor_packed``: the same, sent the way ``acquire`` sends its ``FCALL``: packed once and
  written on a pooled connection, without redis-py's per-command work (informative: the
  round trip alone; the issue's targets are against ``floor``);
- ``acquire_1bucket[_denied]``: ``Limiter.acquire(tenant)`` with only ``tenant:*`` set;
- ``acquire_3bucket[_denied]``: ``Limiter.acquire(tenant, queue)`` with ``tenant:*:queue:q``,
  ``tenant:*`` and ``global`` set;
- ``acquire_1bucket_drained``, ``acquire_3bucket_drained``: the same, allowed, on buckets that
  never fill (burst 1e9 at 1000.5/s), so their tokens are fractions the decision prints and
  writes every time (the allowed cases' buckets stay full, which the lean path writes
  cheaply: issue #14's targets are checked on both);
- ``acquire_credit[_denied]``: ``acquire(tenant)`` with ``tenant:*`` a limit with burst
  credits (#13); ``acquire_2window[_denied]``: ``tenant:*`` two windows, a second and a day
  (denied: the daily one exhausted);
- ``limits`` (moving window, sliding window counter), ``throttled-py`` (token bucket, GCRA),
  ``pyrate-limiter`` (``RedisBucket``, and ``StateBucket`` + ``RedisStateStore`` token bucket).

"Allowed" cases use limits far above what one process can reach, so they never bind;
"denied" cases use an exhausted bucket (1 per hour, burst 1).

All cases are set up first, each in its own keys, then measured in many short interleaved
slices: every round gives each case one slice, in a rotated order. A burst of background load
then spoils one slice of one case rather than a whole case, and the figures reported are
medians over rounds; each ratio is the median of the per-round ratios (the two slices of a
round are seconds apart). Server microseconds per decision come from ``INFO commandstats``,
reset before each slice: the time of the top-level commands, which for a script includes the
``redis.call``s it makes.

Settings (environment, or ``python -m benchmarks --seconds/--rounds``):
``QRL_BENCH_SECONDS`` (timed seconds per slice, default 0.12), ``QRL_BENCH_ROUNDS``
(default 40: about a minute for the 12 cases), ``QRL_BENCH_CASES`` (comma-separated subset).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis

from queue_ratelimit import Decision, Limit, Limiter

from ._common import Sample, env_float, env_int, log, machine_info, median, merge, sig, timed_loop

DEFAULT_SECONDS = 0.12
DEFAULT_ROUNDS = 40
WARMUP_CALLS = 200

# Far above what one process can reach (a few 10k/s): never binds.
HIGH_RATE = 1_000_000
HIGH = Limit(HIGH_RATE, per=1.0)
# One token an hour, burst 1: exhausted by a single acquire, stays exhausted for the run.
TIGHT = Limit(1, per=3600.0)
# Never fills (a day of HIGH-like demand takes 1e8 of its 1e9) and never binds: its tokens
# are fractions, written in full by every decision (as benchmarks/_instructions.py --drained).
DRAINED = Limit(1000.5, per=1.0, burst=1e9)

TENANT = "acme"
QUEUE = "emails"


@dataclass(frozen=True, slots=True)
class Prepared:
    """A ready-to-call decision function, how to read its outcome, and how to clean up."""

    call: Callable[[], object]
    is_allowed: Callable[[object], bool]
    close: Callable[[], None]


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    description: str
    # Called with the Redis URL and a key prefix of the case's own.
    prepare: Callable[[str, str], Prepared]
    expect_allowed: bool = True
    # Commands other than scripts that the library sends itself (directly or from a
    # background thread); they count towards its server time and round trips.
    top_level: frozenset[str] = frozenset()


# -- the floor -------------------------------------------------------------------------------
def _floor(url: str, prefix: str) -> Prepared:
    client = redis.Redis.from_url(url)
    script = client.register_script("return 1")
    return Prepared(call=script, is_allowed=lambda reply: reply == 1, close=client.close)


def _floor_packed(url: str, prefix: str) -> Prepared:
    client = redis.Redis.from_url(url)
    sha = client.script_load("return 1")
    pool = client.connection_pool
    conn = pool.get_connection()
    packed = conn.pack_command("EVALSHA", sha, 0)
    pool.release(conn)

    def call() -> object:
        conn = pool.get_connection()
        try:
            conn.send_packed_command(packed)
            return conn.read_response()
        finally:
            pool.release(conn)

    return Prepared(call=call, is_allowed=lambda reply: reply == 1, close=client.close)


# -- ours ------------------------------------------------------------------------------------
def _allowed_decision(reply: object) -> bool:
    return isinstance(reply, Decision) and reply.allowed


def _ours(buckets: int, denied: bool, url: str, prefix: str, drained: bool = False) -> Prepared:
    limiter = Limiter.from_url(url, namespace=prefix)
    call: Callable[[], Decision]
    high = DRAINED if drained else HIGH
    if buckets == 1:
        limiter.set_limit("tenant:*", TIGHT if denied else high)
        call = partial(limiter.acquire, TENANT)
    else:
        limiter.set_limit("global", high)
        limiter.set_limit("tenant:*", high)
        limiter.set_limit(f"tenant:*:queue:{QUEUE}", TIGHT if denied else high)
        call = partial(limiter.acquire, TENANT, QUEUE)
    first = call()  # exhausts the tight bucket of a denied case
    if len(first.remaining) != buckets:
        raise RuntimeError(f"expected {buckets} buckets, the decision saw {dict(first.remaining)}")
    return Prepared(call=call, is_allowed=_allowed_decision, close=limiter.close)


# A day's worth of HIGH, and one token a day (burst 1): the second window of a 2-window case.
HIGH_DAILY = Limit(HIGH_RATE * 86400.0, per=86400.0)
TIGHT_DAILY = Limit(1, per=86400.0)


def _ours_kind(kind: str, denied: bool, url: str, prefix: str) -> Prepared:
    """acquire(tenant) under a tenant:* limit with burst credits, or with two windows."""
    limiter = Limiter.from_url(url, namespace=prefix)
    if kind == "credit":
        base = TIGHT if denied else HIGH
        limiter.set_limit("tenant:*", Limit(base.rate, base.per, base.burst, credit=base.burst))
    else:
        limiter.set_limit("tenant:*", [HIGH, TIGHT_DAILY if denied else HIGH_DAILY])
    call = partial(limiter.acquire, TENANT)
    call()  # exhausts the tight bucket of a denied case (and, the second, its bank)
    if denied:
        call()
    return Prepared(call=call, is_allowed=_allowed_decision, close=limiter.close)


# Decisions with a priority scope or a pause (issue #13), set up by set_up_kind.
PRIORITY_AND_PAUSE_KINDS = (
    "priority",
    "priority_denied",
    "paused",
    "pause_ended",
    "pause_elsewhere",
)


def set_up_kind(limiter: Limiter, kind: str) -> str | None:
    """Configure ``limiter``'s namespace for one of PRIORITY_AND_PAUSE_KINDS: ``priority``
    and ``priority_denied`` (tenant:* and priority:low, the latter to be exhausted by the
    first decision); ``paused`` (the tenant paused for the whole run: every decision is
    denied by the pause); ``pause_ended`` (a pause of the tenant that ran out: the plan
    still holds it, and each decision compares it with the clock); ``pause_elsewhere``
    (another tenant paused). Returns the priority the decisions are made with."""
    limiter.set_limit("tenant:*", HIGH)
    if kind.startswith("priority"):
        limiter.set_limit("priority:low", TIGHT if kind.endswith("denied") else HIGH)
        return "low"
    if kind == "paused":
        limiter.pause(f"tenant:{TENANT}", 30 * 86400)
    elif kind == "pause_ended":
        ends = limiter.pause(f"tenant:{TENANT}", 0.001).until_ms
        while True:  # (until Redis's clock passes it: a millisecond)
            seconds, micros = limiter.client.time()
            if seconds * 1000 + micros / 1000 > ends:
                break
    else:
        limiter.pause("tenant:someone-else", 30 * 86400)
    return None


def _ours_kinds(kind: str, url: str, prefix: str) -> Prepared:
    """Our decision with a priority scope or a pause (``set_up_kind``)."""
    limiter = Limiter.from_url(url, namespace=prefix)
    priority = set_up_kind(limiter, kind)
    call: Callable[[], Decision] = partial(limiter.acquire, TENANT, None, priority)
    if priority is not None:
        call()  # exhausts the tight bucket of the denied case
    return Prepared(call=call, is_allowed=_allowed_decision, close=limiter.close)


# -- limits ----------------------------------------------------------------------------------
def _limits(strategy: str, url: str, prefix: str) -> Prepared:
    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

    storage = RedisStorage(url, key_prefix=prefix)
    limiter = (
        MovingWindowRateLimiter(storage)
        if strategy == "moving_window"
        else SlidingWindowCounterRateLimiter(storage)
    )
    item = RateLimitItemPerSecond(HIGH_RATE)
    client: Any = storage.get_connection()
    return Prepared(call=partial(limiter.hit, item, TENANT), is_allowed=bool, close=client.close)


# -- throttled-py ----------------------------------------------------------------------------
def _throttled(algorithm: str, url: str, prefix: str) -> Prepared:
    from throttled import RedisStore, Throttled, per_sec

    store = RedisStore(server=url)
    throttle = Throttled(
        key=TENANT,
        using=algorithm,
        quota=per_sec(HIGH_RATE, burst=HIGH_RATE),
        store=store,
        key_prefix=prefix,
    )

    def allowed(result: Any) -> bool:
        return not result.limited

    def close() -> None:
        client: Any = store._backend.get_client()
        client.close()

    return Prepared(call=throttle.limit, is_allowed=allowed, close=close)


# -- pyrate-limiter --------------------------------------------------------------------------
def _pyrate(kind: str, url: str, prefix: str) -> Prepared:
    from pyrate_limiter import (
        Duration,
        Rate,
        RedisBucket,
        RedisStateStore,
        StateBucket,
        TokenBucket,
    )
    from pyrate_limiter import Limiter as PyrateLimiter

    client = redis.Redis.from_url(url)
    rates = [Rate(HIGH_RATE, Duration.SECOND)]
    bucket: Any
    if kind == "redis_bucket":
        bucket = RedisBucket.init(rates, client, prefix)
    else:
        bucket = StateBucket(rates, algorithm=TokenBucket(), store=RedisStateStore(client, prefix))
    limiter = PyrateLimiter(bucket)

    def close() -> None:
        limiter.close()
        client.close()

    return Prepared(
        call=partial(limiter.try_acquire, TENANT, 1, False),  # name, weight, blocking
        is_allowed=bool,
        close=close,
    )


CASES: tuple[Case, ...] = (
    Case("floor", "EVALSHA of `return 1` (one round trip, no work)", _floor),
    Case(
        "floor_packed",
        "EVALSHA of `return 1`, packed once, sent on a pooled connection as acquire sends",
        _floor_packed,
    ),
    Case(
        "acquire_1bucket",
        "Limiter.acquire(tenant): tenant:* bucket, allowed",
        partial(_ours, 1, False),
    ),
    Case(
        "acquire_1bucket_denied",
        "Limiter.acquire(tenant): tenant:* bucket exhausted, denied",
        partial(_ours, 1, True),
        expect_allowed=False,
    ),
    Case(
        "acquire_3bucket",
        "Limiter.acquire(tenant, queue): tenant:queue + tenant + global, allowed",
        partial(_ours, 3, False),
    ),
    Case(
        "acquire_3bucket_denied",
        "Limiter.acquire(tenant, queue): tenant:queue bucket exhausted, denied",
        partial(_ours, 3, True),
        expect_allowed=False,
    ),
    Case(
        "acquire_1bucket_drained",
        "Limiter.acquire(tenant): tenant:* bucket that never fills (fractional tokens), allowed",
        partial(_ours, 1, False, drained=True),
    ),
    Case(
        "acquire_3bucket_drained",
        "Limiter.acquire(tenant, queue): 3 buckets that never fill (fractional tokens), allowed",
        partial(_ours, 3, False, drained=True),
    ),
    Case(
        "acquire_credit",
        "Limiter.acquire(tenant): tenant:* bucket with burst credits, allowed",
        partial(_ours_kind, "credit", False),
    ),
    Case(
        "acquire_credit_denied",
        "Limiter.acquire(tenant): tenant:* bucket and bank exhausted, denied",
        partial(_ours_kind, "credit", True),
        expect_allowed=False,
    ),
    Case(
        "acquire_2window",
        "Limiter.acquire(tenant): tenant:* with two windows (per second, per day), allowed",
        partial(_ours_kind, "windows", False),
    ),
    Case(
        "acquire_2window_denied",
        "Limiter.acquire(tenant): tenant:* with two windows, the daily one exhausted, denied",
        partial(_ours_kind, "windows", True),
        expect_allowed=False,
    ),
    Case(
        "acquire_priority",
        "Limiter.acquire(tenant, priority='low'): tenant:* + priority:low, allowed",
        partial(_ours_kinds, "priority"),
    ),
    Case(
        "acquire_priority_denied",
        "Limiter.acquire(tenant, priority='low'): priority:low exhausted, denied",
        partial(_ours_kinds, "priority_denied"),
        expect_allowed=False,
    ),
    Case(
        "acquire_1bucket_paused",
        "Limiter.acquire(tenant): tenant:* bucket, the tenant paused: denied by the pause",
        partial(_ours_kinds, "paused"),
        expect_allowed=False,
    ),
    Case(
        "acquire_1bucket_pause_ended",
        "Limiter.acquire(tenant): tenant:* bucket, a pause of the tenant that ran out",
        partial(_ours_kinds, "pause_ended"),
    ),
    Case(
        "acquire_1bucket_pause_elsewhere",
        "Limiter.acquire(tenant): tenant:* bucket, another tenant paused",
        partial(_ours_kinds, "pause_elsewhere"),
    ),
    Case(
        "limits_moving_window",
        "limits MovingWindowRateLimiter.hit, RedisStorage",
        partial(_limits, "moving_window"),
    ),
    Case(
        "limits_sliding_window_counter",
        "limits SlidingWindowCounterRateLimiter.hit, RedisStorage",
        partial(_limits, "sliding_window_counter"),
    ),
    Case(
        "throttled_token_bucket",
        "throttled-py Throttled(using='token_bucket').limit, RedisStore",
        partial(_throttled, "token_bucket"),
    ),
    Case(
        "throttled_gcra",
        "throttled-py Throttled(using='gcra').limit, RedisStore",
        partial(_throttled, "gcra"),
    ),
    Case(
        "pyrate_redis_bucket",
        "pyrate-limiter Limiter(RedisBucket).try_acquire(blocking=False)",
        partial(_pyrate, "redis_bucket"),
        # The limiter's background leaker trims the sorted set every 10 s (counted only
        # when it happens to run during one of this case's slices).
        top_level=frozenset({"zremrangebyscore"}),
    ),
    Case(
        "pyrate_state_token_bucket",
        "pyrate-limiter Limiter(StateBucket(TokenBucket, RedisStateStore)).try_acquire",
        partial(_pyrate, "state_token_bucket"),
    ),
)
OURS = ("acquire_1bucket", "acquire_1bucket_denied", "acquire_3bucket", "acquire_3bucket_denied")
LIBRARIES = (
    "limits_moving_window",
    "limits_sliding_window_counter",
    "throttled_token_bucket",
    "throttled_gcra",
    "pyrate_redis_bucket",
    "pyrate_state_token_bucket",
)
KINDS = (
    "acquire_priority",
    "acquire_priority_denied",
    "acquire_1bucket_paused",
    "acquire_1bucket_pause_ended",
    "acquire_1bucket_pause_elsewhere",
)
REFERENCE = "throttled_token_bucket"  # the single-bucket script our server time is held to
# Issue #14: server time against the cheapest other library's decision (at most 1x for one
# bucket, 1.5x for three), on full and on draining buckets.
PEER = "limits_sliding_window_counter"
PEER_BOUNDS = {
    "acquire_1bucket": 1.0,
    "acquire_3bucket": 1.5,
    "acquire_1bucket_drained": 1.0,
    "acquire_3bucket_drained": 1.5,
}


def _prepare(case: Case, url: str) -> Prepared:
    prepared = case.prepare(url, f"qrlbench-{case.name}")
    first = prepared.call()
    if prepared.is_allowed(first) != case.expect_allowed:
        prepared.close()
        raise RuntimeError(
            f"{case.name}: expected allowed={case.expect_allowed}, first reply {first!r}"
        )
    for _ in range(WARMUP_CALLS):
        prepared.call()
    return prepared


def _case_result(case: Case, samples: list[Sample], foreign: frozenset[str]) -> dict[str, Any]:
    total = merge(samples)
    rates = [s.per_second for s in samples]
    server = [s.server_us(case.top_level) for s in samples]
    server_us = median(server)
    return {
        "description": case.description,
        "decisions_per_s": round(median(rates)),
        "decisions_per_s_best": round(max(rates)),
        "client_us_per_decision": sig(1e6 / median(rates)),
        "client_cpu_us_per_decision": sig(median(s.client_cpu_us for s in samples)),
        "server_us_per_decision": sig(server_us),
        "decisions_per_s_per_redis_core": round(1e6 / server_us) if server_us > 0 else None,
        "round_trips_per_decision": sig(total.round_trips(case.top_level)),
        "allowed_fraction": sig(total.allowed / total.decisions),
        "decisions_measured": total.decisions,
        # Background commands of other cases' libraries left out (pyrate's leaker thread).
        "commands_per_decision": total.per_decision(exclude=foreign - case.top_level),
    }


def _paired(
    samples: dict[str, list[Sample]],
    num: str,
    den: str,
    value: Callable[[Case, Sample], float],
    cases: dict[str, Case],
) -> float | None:
    """Median over rounds of value(num) / value(den), pairing the two slices of each round."""
    if num not in samples or den not in samples:
        return None
    pairs = zip(samples[num], samples[den], strict=True)
    return sig(median(value(cases[num], a) / value(cases[den], b) for a, b in pairs))


def _rate(case: Case, sample: Sample) -> float:
    return sample.per_second


def _server(case: Case, sample: Sample) -> float:
    return sample.server_us(case.top_level)


def _ratios(samples: dict[str, list[Sample]], cases: dict[str, Case]) -> dict[str, float | None]:
    ratios: dict[str, float | None] = {}
    for ours in OURS:
        ratios[f"{ours}_vs_floor"] = _paired(samples, ours, "floor", _rate, cases)
        ratios[f"{ours}_vs_floor_packed"] = _paired(samples, ours, "floor_packed", _rate, cases)
    for ours in ("acquire_1bucket", "acquire_3bucket"):
        for lib in LIBRARIES:
            ratios[f"{ours}_vs_{lib}"] = _paired(samples, ours, lib, _rate, cases)
    for ours in OURS:
        ratios[f"server_{ours}_vs_{REFERENCE}"] = _paired(samples, ours, REFERENCE, _server, cases)
    for ours in PEER_BOUNDS:
        ratios[f"server_{ours}_vs_{PEER}"] = _paired(samples, ours, PEER, _server, cases)
    # Priority scopes and pauses against the one-bucket decision, server time (issue #13).
    for kind in KINDS:
        ratios[f"server_{kind}_vs_acquire_1bucket"] = _paired(
            samples, kind, "acquire_1bucket", _server, cases
        )
    return ratios


def _target(value: float | None, bound: float, above: bool) -> dict[str, Any]:
    met = None if value is None else (value >= bound if above else value < bound)
    return {"value": value, "bound": bound, "met": met}


def _at_most(value: float | None, bound: float) -> dict[str, Any]:
    return {"value": value, "bound": bound, "met": None if value is None else value <= bound}


def _targets(ratios: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """The issue's targets (allowed path), then the same checked on the denied path."""
    leads = [ratios.get(f"acquire_1bucket_vs_{lib}") for lib in LIBRARIES]
    known = [v for v in leads if v is not None]
    peer = {
        f"server_us({ours}) <= {bound}x {PEER}": _at_most(
            ratios.get(f"server_{ours}_vs_{PEER}"), bound
        )
        for ours, bound in PEER_BOUNDS.items()
    }
    return peer | {
        "acquire_1bucket >= 0.8x floor": _target(ratios.get("acquire_1bucket_vs_floor"), 0.8, True),
        "acquire_1bucket ahead of every other library": _target(
            min(known) if known else None, 1.0, True
        ),
        "acquire_3bucket >= 0.6x floor": _target(ratios.get("acquire_3bucket_vs_floor"), 0.6, True),
        "server_us(acquire_3bucket) < 2x throttled token bucket": _target(
            ratios.get(f"server_acquire_3bucket_vs_{REFERENCE}"), 2.0, False
        ),
        "acquire_1bucket_denied >= 0.8x floor": _target(
            ratios.get("acquire_1bucket_denied_vs_floor"), 0.8, True
        ),
        "acquire_3bucket_denied >= 0.6x floor": _target(
            ratios.get("acquire_3bucket_denied_vs_floor"), 0.6, True
        ),
        "server_us(acquire_3bucket_denied) < 2x throttled token bucket": _target(
            ratios.get(f"server_acquire_3bucket_denied_vs_{REFERENCE}"), 2.0, False
        ),
    }


def _select_cases() -> list[Case]:
    wanted = {n.strip() for n in os.environ.get("QRL_BENCH_CASES", "").split(",") if n.strip()}
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        raise SystemExit(
            f"unknown QRL_BENCH_CASES {sorted(unknown)}; known: {[c.name for c in CASES]}"
        )
    return [c for c in CASES if not wanted or c.name in wanted]


def _measure(
    cases: list[Case], url: str, admin: redis.Redis, seconds: float, rounds: int
) -> dict[str, list[Sample]]:
    prepared: dict[str, Prepared] = {}
    samples: dict[str, list[Sample]] = {c.name: [] for c in cases}
    try:
        for case in cases:
            prepared[case.name] = _prepare(case, url)
        for r in range(rounds):
            shift = r % len(cases)
            for case in cases[shift:] + cases[:shift]:
                p = prepared[case.name]
                samples[case.name].append(
                    timed_loop(p.call, p.is_allowed, seconds, admin, warmup=0)
                )
            if (r + 1) % max(1, rounds // 4) == 0 or r + 1 == rounds:
                summary = "  ".join(
                    f"{c.name}={median(s.per_second for s in samples[c.name]):,.0f}/s"
                    for c in cases[:5]
                )
                log(f"  round {r + 1}/{rounds}: {summary} ...")
    finally:
        for p in prepared.values():
            p.close()
    return samples


def run(redis_url: str) -> dict[str, Any]:
    seconds = env_float("QRL_BENCH_SECONDS", DEFAULT_SECONDS)
    rounds = env_int("QRL_BENCH_ROUNDS", DEFAULT_ROUNDS)
    cases = _select_cases()
    by_name = {c.name: c for c in cases}
    admin = redis.Redis.from_url(redis_url)
    log(f"decisions: {len(cases)} cases x {rounds} rounds x {seconds:g} s slices on {redis_url}")
    load_before = os.getloadavg()[0]
    admin.flushdb()
    samples = _measure(cases, redis_url, admin, seconds, rounds)
    admin.flushdb()
    load_after = os.getloadavg()[0]

    background = frozenset().union(*(c.top_level for c in cases))
    results = {name: _case_result(by_name[name], s, background) for name, s in samples.items()}
    for name, result in results.items():
        log(
            f"  {name:30} {result['decisions_per_s']:8,}/s  "
            f"client {result['client_us_per_decision']:6.1f} us "
            f"(cpu {result['client_cpu_us_per_decision']:5.1f})  "
            f"server {result['server_us_per_decision']:6.2f} us"
        )
    ratios = _ratios(samples, by_name)
    targets = _targets(ratios)
    for label, target in targets.items():
        log(f"  target {label}: {target['value']} -> {'met' if target['met'] else 'MISSED'}")
    return {
        "settings": {
            "seconds_per_slice": seconds,
            "rounds": rounds,
            "warmup_calls": WARMUP_CALLS,
            "high_limit": str(HIGH),
            "tight_limit": str(TIGHT),
        },
        "machine": {
            **machine_info(admin),
            "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(load_after, 2),
        },
        "cases": results,
        "ratios": ratios,
        "targets": targets,
        "all_targets_met": all(t["met"] for t in targets.values() if t["met"] is not None),
    }
