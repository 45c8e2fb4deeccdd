"""Property tests: a bucket never admits more than R·T + B, and never denies what fits."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import redis
from bucket_state import server_us
from conftest import scratch_limiter
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_ratelimit import Limit, Limiter, Scope

TOLERANCE = 1e-6


@dataclass
class Model:
    """A reference token bucket on the virtual clock, fed only with admitted decisions."""

    rate: float  # tokens per microsecond
    burst: float
    tokens: float | None = None  # None: never used, so full
    at_us: int = 0

    def level(self, now_us: int) -> float:
        if self.tokens is None:
            return self.burst
        return min(self.burst, self.tokens + max(0, now_us - self.at_us) * self.rate)


class VirtualClock:
    """Moves time forward for the buckets of one limiter by back-dating their state.

    Redis's clock cannot be moved, so to let ``d`` seconds pass for a bucket its stored
    ``updated_us`` is rewritten ``d`` seconds further into the past, which is exactly what
    the script would see after a real pause. The virtual time of a decision is Redis's own
    time for it (read back from the state the script wrote) plus every shift made so far, so
    the windows checked are exact, real elapsed time included. Nothing else is simulated.
    """

    def __init__(self, lim: Limiter, scopes: list[str]) -> None:
        self.lim = lim
        self.locations = []
        for scope in scopes:
            location = lim.keys.bucket_location(Scope.parse(scope))
            assert location is not None
            self.locations.append(location)
        self.shift_us = 0

    def advance(self, seconds: float) -> None:
        delta = round(seconds * 1_000_000)
        self.shift_us += delta
        for key, field in self.locations:
            # A bucket is its tokens (field) and their Redis-clock time (field:u).
            updated = self.lim.client.hget(key, f"{field}:u")
            if updated is not None:  # no state yet means a full bucket, at any time
                self.lim.client.hset(key, f"{field}:u", int(float(updated)) - delta)

    def stored(self, index: int) -> tuple[float, int]:
        text, updated = self.stored_text(index)
        return float(text), updated

    def stored_text(self, index: int) -> tuple[str, int]:
        key, field = self.locations[index]
        tokens, updated = self.lim.client.hmget(key, [field, f"{field}:u"])
        assert tokens is not None
        assert updated is not None
        return tokens.decode(), int(float(updated))


def check_windows(admitted: list[tuple[int, float]], limit: Limit) -> None:
    """Every window between two admissions holds at most R·T + B tokens (+ C, the limit's
    burst credit, where it has one), up to the float rounding of sums of that size."""
    for i, (start_us, _) in enumerate(admitted):
        total = 0.0
        for end_us, cost in admitted[i:]:
            total += cost
            span_s = (end_us - start_us) / 1e6
            bound = limit.rate_per_second * span_s + limit.capacity + limit.credit_cap
            assert total <= bound * (1 + 1e-12) + TOLERANCE, (
                f"admitted {total} in {span_s}s, above R*T + B + C = {bound}"
            )


def step_of(tokens: float) -> float:
    """The step a fraction of tokens is stored to (lua/buckets.lua, tokens_text)."""
    return 1e-9 if tokens < 9e6 else 1e-6 if tokens < 9e9 else 1e-3


def check_stored(text: str, tokens: float, model: float, burst: float) -> None:
    """Tokens stored after an admission: in their form (a whole number, or a count of steps
    of its magnitude), never above exact arithmetic from the state before, less than a step
    below it (up to the float rounding of numbers of the burst's size)."""
    slack = 1e-12 * max(1.0, burst)
    if tokens % 1 == 0 or tokens <= 0:
        assert re.fullmatch(r"-?\d+|-?[\d.]+(e-\d+)?", text), text
    else:
        steps, _, exponent = text.partition("e-")
        assert steps.isdigit(), text
        assert 10.0 ** -int(exponent) == step_of(tokens), text
    assert model - step_of(model) - slack <= tokens <= model + slack


def run(
    client: redis.Redis,
    limits: dict[str, Limit],
    ops: list[tuple[float, float]],
    *,
    stepwise: bool = False,
) -> None:
    """Replay (cost, pause) steps on the virtual clock and compare with the reference model.

    Args:
        client: a Redis client.
        limits: the scopes that apply to tenant "acme", with their limits.
        ops: (cost, seconds of virtual pause before the call) steps.
        stepwise: compare each admission's stored tokens with exact arithmetic from the
            state before it (check_stored), the model then going on from what was stored,
            rather than the whole run with exact arithmetic (to within TOLERANCE): for
            buckets whose tokens are too large, or too many, for that.
    """
    scopes = list(limits)
    with scratch_limiter(client) as lim:
        for scope, limit in limits.items():
            lim.set_limit(scope, limit)
        clock = VirtualClock(lim, scopes)
        models = [Model(limit.rate_per_second / 1e6, limit.capacity) for limit in limits.values()]
        admitted: dict[str, list[tuple[int, float]]] = {s: [] for s in scopes}
        for cost, pause in ops:
            clock.advance(pause)
            earliest = server_us(client) + clock.shift_us
            decision = lim.acquire("acme", cost=cost)
            if decision.allowed:
                for index, (scope, model) in enumerate(zip(scopes, models, strict=True)):
                    text, updated = clock.stored_text(index)
                    tokens = float(text)
                    now = updated + clock.shift_us  # the decision's exact virtual time
                    slack = TOLERANCE * max(1.0, cost * 1e-3)
                    assert model.level(now) >= cost - slack, "admitted without the tokens"
                    model.tokens, model.at_us = model.level(now) - cost, now
                    if stepwise:
                        check_stored(text, tokens, model.tokens, model.burst)
                        model.tokens = tokens
                    else:
                        assert tokens == pytest.approx(model.tokens, abs=TOLERANCE)
                    admitted[scope].append((now, cost))
            else:
                # Tokens only grow while nothing is admitted, so if they were short at the
                # decision they were short at `earliest`, a moment before it.
                short = [
                    s
                    for s, m in zip(scopes, models, strict=True)
                    if m.level(earliest) < cost * (1 + 1e-12)
                ]
                assert short, f"denied {cost} although every bucket held it"
                assert decision.denied_by in scopes
                assert decision.wait_ms > 0
        for scope, limit in limits.items():
            check_windows(admitted[scope], limit)


costs = st.one_of(
    st.sampled_from([0.1, 0.25, 0.5, 1.0]),
    st.floats(min_value=0.01, max_value=1.0, allow_nan=False),
)
pauses = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1.0), st.just(1e-6))


@settings(max_examples=150, deadline=None, database=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0, 100.0]),
    burst=st.sampled_from([1.0, 2.0, 5.0, 10.0]),
    ops=st.lists(st.tuples(costs, pauses), min_size=1, max_size=40),
)
def test_one_bucket_never_exceeds_rate_times_time_plus_burst(
    client: redis.Redis, rate: float, burst: float, ops: list[tuple[float, float]]
) -> None:
    # Costs are fractions of the burst and pauses fractions of the time to refill it.
    limit = Limit(rate, burst=burst)
    steps = [(c * burst, p * burst / rate) for c, p in ops]
    run(client, {"tenant:acme": limit}, steps)


@settings(max_examples=100, deadline=None, database=None)
@given(
    tenant=st.tuples(st.sampled_from([1.0, 5.0, 50.0]), st.sampled_from([1.0, 3.0, 8.0])),
    shared=st.tuples(st.sampled_from([2.0, 10.0]), st.sampled_from([2.0, 6.0])),
    ops=st.lists(st.tuples(costs, pauses), min_size=1, max_size=40),
)
def test_two_buckets_each_hold_their_bound(
    client: redis.Redis,
    tenant: tuple[float, float],
    shared: tuple[float, float],
    ops: list[tuple[float, float]],
) -> None:
    limits = {
        "tenant:acme": Limit(tenant[0], burst=tenant[1]),
        "global": Limit(shared[0], burst=shared[1]),
    }
    smallest = min(tenant[1], shared[1])
    steps = [(c * smallest, p * 2) for c, p in ops]
    run(client, limits, steps)


DAY = 86400.0


@settings(max_examples=100, deadline=None, database=None)
@given(
    limit=st.sampled_from(
        [
            Limit(1, per=115 * DAY, burst=1),  # a token every 115 days
            Limit(3, per=115 * DAY, burst=3),
            Limit(1000.5, burst=1e9),  # never refills in a run: fractions of a large number
            Limit(1e7, per=DAY, burst=9e6 + 0.5),  # either side of 9e6
            Limit(1e10, per=DAY, burst=1e10),  # either side of 9e9 (2^53 millionths)
            Limit(1e12, per=DAY, burst=1e12),  # the largest burst
        ]
    ),
    ops=st.lists(
        st.tuples(
            st.one_of(costs, st.just(0.999999), st.just(1e-6), st.floats(0.99, 1.0)),
            pauses,
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_slow_and_large_buckets_store_rounded_down_and_hold_the_bound(
    client: redis.Redis, limit: Limit, ops: list[tuple[float, float]]
) -> None:
    # Costs are fractions of the burst (up to all of it, down to a millionth), pauses
    # fractions of the time to refill it (115 days for the slowest).
    refill_s = limit.capacity / limit.rate_per_second
    steps = [(max(1e-6, c * limit.capacity), p * refill_s) for c, p in ops]
    run(client, {"tenant:acme": limit}, steps, stepwise=True)


def test_real_clock_high_rate_never_exceeds_the_bound(client: redis.Redis) -> None:
    """No simulation: a fast bucket on Redis's real clock, hammered for a few hundred ms."""
    limit = Limit(2000, burst=5)
    with scratch_limiter(client) as lim:
        lim.set_limit("tenant:acme", limit)
        start = server_us(client)
        admitted = 0.0
        for i in range(3000):
            cost = (0.5, 1.0, 2.0)[i % 3]
            if lim.acquire("acme", cost=cost).allowed:
                admitted += cost
        elapsed_s = (server_us(client) - start) / 1e6
        assert admitted <= limit.rate_per_second * elapsed_s + limit.capacity + TOLERANCE
        assert admitted > 0
