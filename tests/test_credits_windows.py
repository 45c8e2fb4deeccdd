"""Burst credits and several windows per scope (#13): the caps hold, against a reference
model on a virtual clock (hypothesis) and under processes racing on Redis's real clock; a
long window's state outlives its tenant's quiet spells and a restart with persistence.

The model states the rules of the issue, not the script's arithmetic: while a bucket is
full its refill flows into the bank (at most ``credit``); an admission takes the bucket's
tokens first, then the bank's. Over any interval T a window admits at most
``R*T + B + C``; every window of a scope must admit a job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis
from bucket_state import server_us
from conftest import RedisProcess, scratch_limiter
from hypothesis import given, settings
from hypothesis import strategies as st
from race_support import race
from test_properties import TOLERANCE, check_windows, costs, pauses

from queue_ratelimit import CostExceedsBurst, Limit, Limiter, Scope


@dataclass
class Window:
    """A reference window on the virtual clock: its bucket and its bank of credit."""

    limit: Limit
    own: float | None = None  # None: never used, so full (bank included)
    bank: float = 0.0
    at_us: int = 0

    def state(self, now_us: int) -> tuple[float, float]:
        burst, credit = self.limit.capacity, self.limit.credit_cap
        if self.own is None:
            return burst, credit
        refill = max(0, now_us - self.at_us) * self.limit.rate_per_second / 1e6
        if self.own + refill <= burst:
            return self.own + refill, self.bank
        # Full: the rest of the refill flows into the bank, up to the credit.
        return burst, min(credit, self.bank + self.own + refill - burst)

    def level(self, now_us: int) -> float:
        return sum(self.state(now_us))

    def take(self, now_us: int, cost: float) -> None:
        own, bank = self.state(now_us)
        if cost <= own:
            own -= cost
        else:  # the bucket's own first, the rest from the bank
            bank -= cost - own
            own = 0.0
        self.own, self.bank, self.at_us = own, bank, now_us


class VirtualClock:
    """Lets time pass for a namespace's buckets by back-dating their clocks (every
    ``<field>:u`` of the tenant's hash and the shared one), as tests/test_properties.py
    does for one field: exactly what the script would see after a real pause."""

    def __init__(self, lim: Limiter, tenant: str) -> None:
        self.lim = lim
        self.keys = [lim.keys.tenant(tenant), lim.keys.shared]
        self.shift_us = 0

    def advance(self, seconds: float) -> None:
        delta = round(seconds * 1_000_000)
        self.shift_us += delta
        for key in self.keys:
            fields = self.lim.client.hgetall(key)
            moved = {f: int(float(v)) - delta for f, v in fields.items() if f.endswith(b":u")}
            if moved:
                self.lim.client.hset(key, mapping=moved)


def replay(
    client: redis.Redis, scope: str, windows: list[Limit], ops: list[tuple[float, float]]
) -> int:
    """(cost, pause) steps against one scope of tenant acme; every decision compared with
    the model, every window's cap checked at the end. Returns the admissions."""
    with scratch_limiter(client) as lim:
        lim.set_limit(scope, windows if len(windows) > 1 else windows[0])
        location = lim.keys.bucket_location(Scope.parse(scope))
        assert location is not None
        key, base = location
        fields = lim.keys.window_fields(base, [w.per for w in windows])
        models = [Window(w) for w in windows]
        clock = VirtualClock(lim, "acme")
        admitted: list[list[tuple[int, float]]] = [[] for _ in windows]
        for cost, pause in ops:
            clock.advance(pause)
            earliest = server_us(client) + clock.shift_us
            decision = lim.acquire("acme", cost=cost)
            if not decision.allowed:
                short = [m for m in models if m.level(earliest) < cost]
                assert short, f"denied {cost} although every window held it"
                assert decision.denied_by == scope
                assert decision.wait_ms > 0
                if len(windows) > 1:
                    assert decision.window is not None
                continue
            for index, (model, field) in enumerate(zip(models, fields, strict=True)):
                own, updated, bank = client.hmget(key, [field, f"{field}:u", f"{field}:c"])
                assert own is not None
                assert updated is not None
                now = int(float(updated)) + clock.shift_us  # the decision's virtual time
                assert model.level(now) >= cost - TOLERANCE, "admitted without the tokens"
                model.take(now, cost)
                assert float(own) == pytest.approx(model.own, abs=TOLERANCE)
                assert float(bank or 0) == pytest.approx(model.bank, abs=TOLERANCE)
                admitted[index].append((now, cost))
            # `remaining` counts the bank in; `credit` shows it (first window's name).
            first = models[fields.index(base)]
            if first.limit.credit is not None:
                assert decision.credit[scope] == pytest.approx(first.bank, abs=TOLERANCE)
                assert decision.remaining[scope] == pytest.approx(
                    first.own + first.bank, abs=TOLERANCE
                )
        for limit, times in zip(windows, admitted, strict=True):
            check_windows(times, limit)
        return len(admitted[0])


@settings(max_examples=150, deadline=None, database=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
    burst=st.sampled_from([1.0, 2.0, 5.0]),
    credit=st.sampled_from([0.5, 1.0, 3.0, 20.0]),
    shared=st.booleans(),
    ops=st.lists(st.tuples(costs, pauses), min_size=1, max_size=40),
)
def test_credit_holds_r_t_plus_b_plus_c_and_spends_the_bucket_first(
    client: redis.Redis,
    rate: float,
    burst: float,
    credit: float,
    shared: bool,
    ops: list[tuple[float, float]],
) -> None:
    # Costs are fractions of what the bucket (or, sometimes, bucket and bank) holds;
    # pauses fractions of the time to fill both from empty.
    limit = Limit(rate, burst=burst, credit=credit)
    most = burst + credit
    steps = [(c * (burst if i % 3 else most), p * most / rate) for i, (c, p) in enumerate(ops)]
    replay(client, "global" if shared else "tenant:acme", [limit], steps)


@settings(max_examples=100, deadline=None, database=None)
@given(
    short=st.tuples(st.sampled_from([1.0, 5.0]), st.sampled_from([1.0, 3.0])),
    credit=st.sampled_from([None, 2.0]),
    long=st.tuples(st.sampled_from([3.0, 8.0]), st.sampled_from([10.0, 60.0])),
    ops=st.lists(st.tuples(costs, pauses), min_size=1, max_size=40),
)
def test_windows_each_hold_their_cap_and_admit_all_or_nothing(
    client: redis.Redis,
    short: tuple[float, float],
    credit: float | None,
    long: tuple[float, float],
    ops: list[tuple[float, float]],
) -> None:
    windows = [
        Limit(long[0], per=long[1]),  # listed first: the order given is kept
        Limit(short[0], burst=short[1], credit=credit),
    ]
    smallest = min(short[1], long[0])
    steps = [(c * smallest, p * long[1] / 4) for c, p in ops]
    replay(client, "tenant:acme", windows, steps)


def test_quiet_for_ten_seconds_then_sixty_at_once_then_ten_a_second(
    client: redis.Redis,
) -> None:
    """The issue's example, on the virtual clock: 10/s, burst 10, credit 50. (Jobs of cost
    60 and 10 stand for as many jobs at once: the real time between 60 calls would refill
    a fraction of a token.)"""
    with scratch_limiter(client) as lim:
        lim.set_limit("tenant:*", Limit.parse("10/s", burst=10, credit=50))
        assert lim.acquire("acme", cost=60).allowed, "a new tenant: bucket and bank full"
        assert not lim.acquire("acme").allowed
        clock = VirtualClock(lim, "acme")
        clock.advance(10)  # quiet: 100 tokens of refill, of which 10 + 50 are kept
        assert lim.peek("acme").remaining["tenant:acme"] == pytest.approx(60)
        with pytest.raises(CostExceedsBurst):  # never more than burst + credit at once
            lim.peek("acme", cost=60.5)
        # (Real time refills from this acquire on: `extra` below counts from before it.)
        started = time.monotonic()
        decision = lim.acquire("acme", cost=60)
        assert decision.allowed
        assert decision.credit["tenant:acme"] == pytest.approx(0, abs=0.01)
        clock.advance(1)
        # Then the bucket's rate: the bank regrows only once the bucket is full.
        assert lim.acquire("acme", cost=10).allowed
        assert not lim.acquire("acme").allowed
        clock.advance(2)
        decision = lim.peek("acme")
        # (Real time passes between the calls too, and refills at 10/s: up to `extra` more.)
        extra = 10 * (time.monotonic() - started) + 0.01
        assert 20 - 0.01 <= decision.remaining["tenant:acme"] <= 20 + extra
        assert 10 - 0.01 <= decision.credit["tenant:acme"] <= 10 + extra


# -- processes racing on Redis's real clock ---------------------------------------------

PROCESSES = 6
SECONDS = 2.0


@pytest.mark.slow
def test_processes_never_overspend_bucket_and_bank(limiter: Limiter, redis_url: str) -> None:
    limit = Limit(100, burst=20, credit=80)
    limiter.set_limit("tenant:acme", limit)
    admitted, _, elapsed = race(limiter, redis_url, PROCESSES, SECONDS)
    assert admitted <= limit.rate_per_second * elapsed + 20 + 80, f"{admitted} in {elapsed:.3f}s"
    # The bank was full at the start: it was spent, not left over.
    assert admitted >= 100 + 0.8 * limit.rate_per_second * SECONDS, admitted
    bank = limiter.client.hget(limiter.keys.tenant("acme"), "b:c")
    assert bank is not None
    assert float(bank) < 1


@pytest.mark.slow
def test_processes_never_overspend_the_tighter_window(limiter: Limiter, redis_url: str) -> None:
    # 200/s binds at first; 150 per 10 s (burst 150) once the first 150 are taken.
    windows = [Limit(200, burst=20), Limit(150, per=10)]
    limiter.set_limit("tenant:acme", windows)
    admitted, _, elapsed = race(limiter, redis_url, PROCESSES, SECONDS)
    assert admitted <= 15 * elapsed + 150, f"{admitted} in {elapsed:.3f}s"
    assert admitted <= 200 * elapsed + 20
    assert admitted >= 150, "the long window's burst was taken"


# -- long windows keep their state -------------------------------------------------------


def test_a_daily_windows_state_lives_until_it_would_be_full_again(limiter: Limiter) -> None:
    """The tenant hash expires only when every window, the daily one too, would have
    refilled (a missing bucket is a full one): a drained daily quota is not handed out
    again by an early expiry."""
    limiter.set_limit("tenant:acme", ["100/s", "50/d"])
    for _ in range(40):
        assert limiter.acquire("acme").allowed
    key = limiter.keys.tenant("acme")
    # 40 of 50 tokens taken at 50 a day: about 69,000 s to refill.
    ttl_s = limiter.client.pttl(key) / 1000
    assert ttl_s >= 40 * 86400 / 50, ttl_s
    assert limiter.client.hget(key, "b:w86400") is not None
    decision = limiter.peek("acme")
    assert decision.remaining["tenant:acme (50/d)"] == pytest.approx(10, abs=0.1)


def test_a_banked_credit_lives_until_it_would_be_full_again(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=60, burst=1, credit=100))
    assert limiter.acquire("acme", cost=50).allowed
    # 50 tokens short at 1 a minute: 3,000 s before bucket and bank are full again.
    assert limiter.client.pttl(limiter.keys.tenant("acme")) / 1000 >= 3000 - 1


def test_long_windows_and_banks_survive_a_restart_with_persistence(
    redis_process: Callable[..., RedisProcess],
) -> None:
    """A crash (SIGKILL) of a server with an append-only file: the daily window's tokens,
    the bank and the expiry that keeps them all come back as they were."""
    server = redis_process(extra=["--appendonly", "yes", "--appendfsync", "always"])
    lim = Limiter.from_url(server.url, namespace="restart")
    lim.set_limit("tenant:acme", ["100/s", "50/d"])
    lim.set_limit("global", Limit(1, per=60, burst=1, credit=10))
    for _ in range(30):
        assert lim.acquire("acme").allowed is (_ < 11)  # global: 1 + 10 banked
    key = lim.keys.tenant("acme")
    before = lim.client.hgetall(key), lim.client.hgetall(lim.keys.shared)
    expiry = lim.client.pexpiretime(key)
    lim.close()
    server.stop()
    server.start()
    lim = Limiter.from_url(server.url, namespace="restart")
    try:
        assert (lim.client.hgetall(key), lim.client.hgetall(lim.keys.shared)) == before
        assert lim.client.pexpiretime(key) == expiry
        decision = lim.peek("acme")
        assert decision.remaining["tenant:acme (50/d)"] == pytest.approx(39, abs=0.01)
        assert decision.credit["global"] == pytest.approx(0, abs=0.01)
    finally:
        lim.close()
