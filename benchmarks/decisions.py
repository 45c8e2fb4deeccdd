"""Decision throughput and server cost: our ``acquire`` against the floor and other libraries.

Every case makes decisions back to back from this one Python process, one client, one
connection, same redis-py settings (``redis.Redis.from_url`` defaults), on the same Redis
server, in the same run:

- ``floor``: ``EVALSHA`` of ``return 1`` (one round trip and nothing else);
- ``acquire_1bucket[_denied]``: ``Limiter.acquire(tenant)`` with only ``tenant:*`` set;
- ``acquire_3bucket[_denied]``: ``Limiter.acquire(tenant, queue)`` with ``tenant:*:queue:q``,
  ``tenant:*`` and ``global`` set;
- ``limits`` (moving window, sliding window counter), ``throttled-py`` (token bucket, GCRA),
  ``pyrate-limiter`` (``RedisBucket``, and ``StateBucket`` + ``RedisStateStore`` token bucket).

"Allowed" cases use limits far above what one process can reach, so they never bind;
"denied" cases use an exhausted bucket (1 per hour, burst 1). Cases run in rounds, each round
in a rotated order, and the median round is reported, so drift and noise hit all alike.
Server microseconds per decision come from ``INFO commandstats`` (reset before each
measurement): the time of the top-level commands, which for a script includes the
``redis.call``s inside it.

Many short rounds rather than a few long ones: a burst of background load then spoils one
slice of one case, not a whole case, and the median discards it.

Settings (environment): ``QRL_BENCH_SECONDS`` (timed seconds per measurement, default 0.6),
``QRL_BENCH_ROUNDS`` (default 7; about a minute in all), ``QRL_BENCH_CASES`` (comma-separated
subset of case names).
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

DEFAULT_SECONDS = 0.6
DEFAULT_ROUNDS = 7

# Far above what one process can reach (a few 10k/s): never binds.
HIGH_RATE = 1_000_000
HIGH = Limit(HIGH_RATE, per=1.0)
# One token an hour, burst 1: exhausted by a single acquire, stays exhausted for the run.
TIGHT = Limit(1, per=3600.0)

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
    prepare: Callable[[str], Prepared]
    expect_allowed: bool = True
    # Commands other than scripts that the library sends itself (directly or from a
    # background thread); they count towards its server time and round trips.
    top_level: frozenset[str] = frozenset()


# -- the floor -------------------------------------------------------------------------------
def _floor(url: str) -> Prepared:
    client = redis.Redis.from_url(url)
    script = client.register_script("return 1")
    return Prepared(call=script, is_allowed=lambda reply: reply == 1, close=client.close)


# -- ours ------------------------------------------------------------------------------------
def _allowed_decision(reply: object) -> bool:
    return isinstance(reply, Decision) and reply.allowed


def _ours(buckets: int, denied: bool, url: str) -> Prepared:
    limiter = Limiter.from_url(url, namespace=f"bench{buckets}")
    call: Callable[[], Decision]
    if buckets == 1:
        limiter.set_limit("tenant:*", TIGHT if denied else HIGH)
        call = partial(limiter.acquire, TENANT)
    else:
        limiter.set_limit("global", HIGH)
        limiter.set_limit("tenant:*", HIGH)
        limiter.set_limit(f"tenant:*:queue:{QUEUE}", TIGHT if denied else HIGH)
        call = partial(limiter.acquire, TENANT, QUEUE)
    first = call()  # exhausts the tight bucket of a denied case
    if len(first.remaining) != buckets:
        raise RuntimeError(f"expected {buckets} buckets, the decision saw {dict(first.remaining)}")
    return Prepared(call=call, is_allowed=_allowed_decision, close=limiter.close)


# -- limits ----------------------------------------------------------------------------------
def _limits(strategy: str, url: str) -> Prepared:
    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

    storage = RedisStorage(url)
    limiter = (
        MovingWindowRateLimiter(storage)
        if strategy == "moving_window"
        else SlidingWindowCounterRateLimiter(storage)
    )
    item = RateLimitItemPerSecond(HIGH_RATE)
    return Prepared(
        call=partial(limiter.hit, item, TENANT),
        is_allowed=bool,
        close=storage.get_connection().close,
    )


# -- throttled-py ----------------------------------------------------------------------------
def _throttled(algorithm: str, url: str) -> Prepared:
    from throttled import RedisStore, Throttled, per_sec

    store = RedisStore(server=url)
    throttle = Throttled(
        key=TENANT, using=algorithm, quota=per_sec(HIGH_RATE, burst=HIGH_RATE), store=store
    )

    def allowed(result: Any) -> bool:
        return not result.limited

    def close() -> None:
        store._backend.get_client().close()

    return Prepared(call=throttle.limit, is_allowed=allowed, close=close)


# -- pyrate-limiter --------------------------------------------------------------------------
def _pyrate(kind: str, url: str) -> Prepared:
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
        bucket = RedisBucket.init(rates, client, "bench:pyrate")
    else:
        bucket = StateBucket(
            rates, algorithm=TokenBucket(), store=RedisStateStore(client, "bench:pyrate-tb")
        )
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
        # The limiter's background leaker trims the sorted set every 10 s.
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
_LEAD_KEYS = frozenset(f"acquire_1bucket_vs_{lib}" for lib in LIBRARIES)


def _measure(case: Case, url: str, admin: redis.Redis, seconds: float) -> Sample:
    admin.flushdb()
    prepared = case.prepare(url)
    try:
        first = prepared.call()
        if prepared.is_allowed(first) != case.expect_allowed:
            raise RuntimeError(
                f"{case.name}: expected allowed={case.expect_allowed}, first reply {first!r}"
            )
        return timed_loop(prepared.call, prepared.is_allowed, seconds, admin)
    finally:
        prepared.close()


def _case_result(case: Case, samples: list[Sample]) -> dict[str, Any]:
    total = merge(samples)
    rates = [s.per_second for s in samples]
    server = [s.server_us(case.top_level) for s in samples]
    server_us = median(server)
    return {
        "description": case.description,
        "decisions_per_s": round(median(rates)),
        "decisions_per_s_best": round(max(rates)),
        "decisions_per_s_rounds": [round(r) for r in rates],
        "client_us_per_decision": sig(1e6 / median(rates)),
        "client_cpu_us_per_decision": sig(median(s.client_cpu_us for s in samples)),
        "server_us_per_decision": sig(server_us),
        "server_us_rounds": [sig(s) for s in server],
        "decisions_per_s_per_redis_core": round(1e6 / server_us) if server_us > 0 else None,
        "round_trips_per_decision": sig(total.round_trips(case.top_level)),
        "allowed_fraction": sig(total.allowed / total.decisions),
        "commands_per_decision": total.per_decision(),
    }


def _ratio(
    samples: dict[str, list[Sample]], num: str, den: str, value: Callable[[Sample], float]
) -> float | None:
    """Median over rounds of value(num) / value(den), pairing the two runs of each round."""
    if num not in samples or den not in samples:
        return None
    pairs = zip(samples[num], samples[den], strict=True)
    return sig(median(value(a) / value(b) for a, b in pairs))


def _target(value: float | None, bound: float, above: bool) -> dict[str, Any]:
    met = None if value is None else (value >= bound if above else value < bound)
    return {"value": value, "bound": bound, "met": met}


def _ratios(samples: dict[str, list[Sample]], cases: dict[str, Case]) -> dict[str, float | None]:
    def rate(s: Sample) -> float:
        return s.per_second

    ratios: dict[str, float | None] = {}
    for ours in OURS:
        ratios[f"{ours}_vs_floor"] = _ratio(samples, ours, "floor", rate)
    for ours in ("acquire_1bucket", "acquire_3bucket"):
        for lib in LIBRARIES:
            ratios[f"{ours}_vs_{lib}"] = _ratio(samples, ours, lib, rate)
    reference = "throttled_token_bucket"
    for ours in OURS:
        if ours in cases and reference in cases:
            ratios[f"server_{ours}_vs_{reference}"] = _server_ratio(
                samples[ours],
                samples[reference],
                cases[ours].top_level,
                cases[reference].top_level,
            )
    return ratios


def _server_ratio(
    ours: list[Sample], theirs: list[Sample], mine: frozenset[str], their: frozenset[str]
) -> float:
    """Median over rounds of server_us(ours) / server_us(theirs), paired by round."""
    pairs = zip(ours, theirs, strict=True)
    return sig(median(a.server_us(mine) / b.server_us(their) for a, b in pairs))


def _targets(ratios: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """The issue's targets; each also checked on the denied path, which does more work."""
    ahead = [v for k, v in ratios.items() if v is not None and k in _LEAD_KEYS]
    return {
        "acquire_1bucket >= 0.8x floor": _target(ratios.get("acquire_1bucket_vs_floor"), 0.8, True),
        "acquire_1bucket ahead of every other library": _target(
            min(ahead) if ahead else None, 1.0, True
        ),
        "acquire_3bucket >= 0.6x floor": _target(ratios.get("acquire_3bucket_vs_floor"), 0.6, True),
        "server_us(acquire_3bucket) < 2x throttled token bucket": _target(
            ratios.get("server_acquire_3bucket_vs_throttled_token_bucket"), 2.0, False
        ),
        "acquire_1bucket_denied >= 0.8x floor": _target(
            ratios.get("acquire_1bucket_denied_vs_floor"), 0.8, True
        ),
        "acquire_3bucket_denied >= 0.6x floor": _target(
            ratios.get("acquire_3bucket_denied_vs_floor"), 0.6, True
        ),
        "server_us(acquire_3bucket_denied) < 2x throttled token bucket": _target(
            ratios.get("server_acquire_3bucket_denied_vs_throttled_token_bucket"), 2.0, False
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


def run(redis_url: str) -> dict[str, Any]:
    seconds = env_float("QRL_BENCH_SECONDS", DEFAULT_SECONDS)
    rounds = env_int("QRL_BENCH_ROUNDS", DEFAULT_ROUNDS)
    cases = _select_cases()
    by_name = {c.name: c for c in cases}

    admin = redis.Redis.from_url(redis_url)
    load_before = os.getloadavg()
    samples: dict[str, list[Sample]] = {c.name: [] for c in cases}
    log(f"decisions: {len(cases)} cases x {rounds} rounds x {seconds:g} s on {redis_url}")
    for r in range(rounds):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            sample = _measure(case, redis_url, admin, seconds)
            samples[case.name].append(sample)
            server_us = sample.server_us(case.top_level)
            log(
                f"  round {r + 1}/{rounds} {case.name:30} {sample.per_second:8,.0f}/s  "
                f"client {sample.client_us:6.1f} us (cpu {sample.client_cpu_us:5.1f})  "
                f"server {server_us:6.2f} us"
            )
    admin.flushdb()

    ratios = _ratios(samples, by_name)
    targets = _targets(ratios)
    return {
        "settings": {"seconds_per_measurement": seconds, "rounds": rounds, "warmup_calls": 200},
        "machine": {
            **machine_info(admin),
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        },
        "cases": {name: _case_result(by_name[name], s) for name, s in samples.items()},
        "ratios": ratios,
        "targets": targets,
        "all_targets_met": all(t["met"] for t in targets.values() if t["met"] is not None),
    }
