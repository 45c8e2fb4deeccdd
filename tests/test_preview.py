"""Traffic recording and previews of a limit change: the replay model (table-driven and
property-based), which traffic a scope governs, and the whole path on a real Redis."""

from __future__ import annotations

import math

import pytest
import redis
from conftest import scratch_limiter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_credits_windows import VirtualClock

from queue_ratelimit import ConfigError, FairScheduler, InvalidLimit, Limit, Limiter, Scope
from queue_ratelimit._preview import _bucket_of, group_traffic, preview_fields, replay

HOUR = 3600.0


# -- the replay model ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arrivals", "limit", "end", "expected"),
    [
        pytest.param([], Limit(10), 10, (0, 0, 0), id="no traffic"),
        pytest.param([(0, 10)], Limit(10), 10, (0, 0, 0), id="exactly the burst"),
        pytest.param([(0, 50)], Limit(10), 10, (40, 4, 0), id="a burst above it"),
        pytest.param([(0, 50)], Limit(10), 2, (40, 4, 20), id="still waiting at the end"),
        pytest.param([(t, 10) for t in range(10)], Limit(10), 10, (0, 0, 0), id="at the rate"),
        pytest.param(
            [(t, 11) for t in range(10)], Limit(10), 10, (55, 1, 0), id="10% over the rate"
        ),
        pytest.param([(0, 30), (1, 5)], Limit(10), 10, (25, 2, 0), id="queued behind a burst"),
        pytest.param(
            [(0, 10), (100, 15)], Limit(10), 200, (5, 0.5, 0), id="idle refills to burst only"
        ),
        pytest.param([(0, 10)], Limit(5, per=2), 10, (5, 2, 0), id="5/2s"),
        pytest.param([(0, 3)], Limit(1, per=HOUR), HOUR, (2, 2 * HOUR, 1), id="1/hour"),
        pytest.param([(0, 0.5), (0, 0.7)], Limit(1), 5, (0.2, 0.2, 0), id="fractional costs"),
    ],
)
def test_replay(
    arrivals: list[tuple[float, float]],
    limit: Limit,
    end: float,
    expected: tuple[float, float, float],
) -> None:
    delayed, longest, backlog = replay(arrivals, limit, end)
    assert (delayed, longest, backlog) == pytest.approx(expected)


MINUTE_20 = Limit(20, per=60)
WITH_CREDIT = Limit(10, burst=10, credit=50)


@pytest.mark.parametrize(
    ("arrivals", "windows", "end", "expected"),
    [
        # The per-second window binds first (10/s), and the minute's 20 tokens drain
        # meanwhile; once both are dry, the minute's 1/3 per second: started by t is
        # 20 + t/3, so the last of 30 starts at 30 s.
        pytest.param([(0, 30)], [Limit(10), MINUTE_20], 60, (20, 30, 0), id="the longer binds"),
        pytest.param([(0, 30)], [Limit(10), MINUTE_20], 3, (20, 30, 9), id="waiting at the end"),
        pytest.param(
            [(t, 10) for t in range(3)],
            [Limit(10), MINUTE_20],
            60,
            (28 / 3, 28, 0),  # (the minute has 2/3 left at 2 s; the rest by 30 s)
            id="the minute's quota runs out at the second's rate",
        ),
        pytest.param([(0, 5), (30, 5)], [Limit(10), MINUTE_20], 60, (0, 0, 0), id="within both"),
        pytest.param([(0, 60)], [WITH_CREDIT], 10, (0, 0, 0), id="burst and credit at once"),
        pytest.param([(0, 70)], [WITH_CREDIT], 10, (10, 1, 0), id="beyond burst and credit"),
        # The bank regrows only once the bucket is full: 3 s after spending both, 30 back.
        pytest.param([(0, 60), (3, 60)], [WITH_CREDIT], 10, (30, 3, 0), id="credit regrows"),
        pytest.param(
            [(0, 60)],
            [WITH_CREDIT, MINUTE_20],
            60,  # (20 of the 40 still wait then)
            (40, 120, 20),
            id="credit under a tighter window",
        ),
    ],
)
def test_replay_of_windows_and_credit(
    arrivals: list[tuple[float, float]],
    windows: list[Limit],
    end: float,
    expected: tuple[float, float, float],
) -> None:
    assert replay(arrivals, windows, end) == pytest.approx(expected)
    if len(windows) == 1:  # one Limit or a list of one: the same replay
        assert replay(arrivals, windows[0], end) == pytest.approx(expected)


def test_replay_does_not_delay_what_float_rounding_leaves_short() -> None:
    # 0.7 - 0.4 is 0.29999999999999993 in floats: the refill still covers a cost of 0.3.
    assert replay([(0.4, 1), (0.7, 0.3)], Limit(1), 5) == (0, 0, 0)


per_second = st.lists(st.integers(0, 50), min_size=1, max_size=60)
limits = st.builds(
    Limit, st.integers(1, 40).map(float), st.just(1.0), st.integers(1, 60).map(float)
)


def as_arrivals(counts: list[int]) -> list[tuple[float, float]]:
    return [(float(t), float(n)) for t, n in enumerate(counts) if n]


@settings(max_examples=300, deadline=None)
@given(per_second, limits)
def test_replay_delays_nothing_that_fits_and_never_more_than_ran(
    counts: list[int], limit: Limit
) -> None:
    arrivals = as_arrivals(counts)
    delayed, longest, backlog = replay(arrivals, limit, len(counts))
    assert 0 <= delayed <= sum(counts) + 1e-9
    assert backlog <= delayed + 1e-9
    if max(counts) <= min(limit.rate, limit.capacity):
        assert (delayed, longest, backlog) == (0, 0, 0)
    if delayed == 0:
        assert longest == 0


@settings(max_examples=300, deadline=None)
@given(per_second, limits, st.integers(1, 40))
def test_a_higher_rate_never_delays_more(counts: list[int], limit: Limit, more: int) -> None:
    arrivals = as_arrivals(counts)
    faster = Limit(limit.rate + more, burst=limit.capacity)
    slow, fast = replay(arrivals, limit, len(counts)), replay(arrivals, faster, len(counts))
    assert fast[0] <= slow[0] + 1e-9
    assert fast[1] <= slow[1] + 1e-9


@settings(max_examples=300, deadline=None)
@given(per_second, limits)
def test_the_work_served_by_any_moment_stays_within_the_bucket(
    counts: list[int], limit: Limit
) -> None:
    """Whatever waits starts no earlier than the bucket allows: by time t at most
    burst + rate * t of the work has started (the caps the replay stands for)."""
    arrivals = as_arrivals(counts)
    delayed, _, backlog = replay(arrivals, limit, len(counts))
    started = sum(counts) - backlog
    assert started <= limit.capacity + limit.rate * len(counts) + 1e-6
    if delayed:
        assert sum(counts) > min(limit.capacity, limit.rate)


@settings(max_examples=200, deadline=None)
@given(per_second, limits, limits.map(lambda w: Limit(w.rate * 30, per=60, burst=w.capacity * 3)))
def test_a_second_window_never_delays_less_and_holds_both_caps(
    counts: list[int], short: Limit, long: Limit
) -> None:
    """Adding a window only ever delays more; what starts by any moment stays within each
    window's bucket."""
    arrivals = as_arrivals(counts)
    one = replay(arrivals, short, len(counts))
    both = replay(arrivals, [short, long], len(counts))
    assert both[0] >= one[0] - 1e-6
    started = sum(counts) - both[2]
    for w in (short, long):
        assert started <= w.capacity + w.rate_per_second * len(counts) + 1e-6


# The windows the replay is checked against the Lua with: each admits whole costs of up to
# its smallest capacity (burst + credit), at rates whose refills fall on thirds of a token,
# far from the few milliseconds of real time that pass between two calls.
LUA_WINDOWS = [
    [Limit(5, burst=5)],
    [Limit(5, burst=5, credit=10)],
    [Limit(5, burst=5), Limit(20, per=60)],
    [Limit(3, burst=2, credit=4), Limit(40, per=60, burst=30)],
]


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # (a client: nothing to reset)
)
@given(
    st.sampled_from(LUA_WINDOWS),
    st.lists(st.tuples(st.integers(0, 4), st.integers(1, 12)), min_size=1, max_size=12),
)
def test_the_replay_admits_what_the_lua_admits(
    redis_client: redis.Redis, windows: list[Limit], steps: list[tuple[int, int]]
) -> None:
    """The replay's buckets are the script's: lumps of work arriving on a virtual clock,
    each a single decision, are all admitted by acquire.lua exactly as long as the replay
    delays none of them (up to the first, both are the same buckets; from it on, the
    script denies and the replay makes it wait)."""
    with scratch_limiter(redis_client) as lim:
        lim.set_limit("tenant:acme", windows)
        most = min(w.capacity + w.credit_cap for w in windows)
        clock = VirtualClock(lim, "acme")
        arrivals: list[tuple[float, float]] = []
        at = 0.0
        for gap, asked in steps:
            cost = min(asked, int(most))
            at += gap
            clock.advance(gap)
            arrivals.append((at, float(cost)))
            delayed = replay(arrivals, windows, at)[0]
            allowed = lim.acquire("acme", cost=cost).allowed
            assert allowed == (delayed == 0), (arrivals, delayed)
            if not allowed:
                break


# -- which traffic a scope's limit governs ---------------------------------------------------
OWN = frozenset({"tenant:vip-own", "tenant:acme:queue:emails"})


@pytest.mark.parametrize(
    ("scope", "tenant", "queue", "exempt", "bucket"),
    [
        ("global", "acme", "-", None, "global"),
        ("global", "acme", "-", "tenant", "global"),
        ("global", "acme", "-", "all", None),
        ("queue:emails", "acme", "emails", None, "queue:emails"),
        ("queue:emails", "acme", "-", None, None),
        ("queue:emails", "acme", "emails", "all", None),
        ("tenant:acme", "acme", "emails", None, "tenant:acme"),
        ("tenant:acme", "bob", "emails", None, None),
        ("tenant:acme", "acme", "-", "tenant", None),
        ("tenant:*", "bob", "-", None, "tenant:bob"),
        ("tenant:*", "vip-own", "-", None, None),
        ("tenant:*", "bob", "-", "all", None),
        ("tenant:*:queue:emails", "bob", "emails", None, "tenant:bob:queue:emails"),
        ("tenant:*:queue:emails", "acme", "emails", None, None),
        ("tenant:*:queue:emails", "bob", "sms", None, None),
        ("tenant:bob:queue:sms", "bob", "sms", None, "tenant:bob:queue:sms"),
        ("tenant:bob:queue:sms", "bob", "emails", None, None),
    ],
)
def test_the_buckets_a_scope_governs(
    scope: str, tenant: str, queue: str, exempt: str | None, bucket: str | None
) -> None:
    assert _bucket_of(Scope.parse(scope), tenant, queue, exempt, OWN) == bucket


def test_traffic_is_grouped_by_bucket_and_second() -> None:
    minutes = {
        100: {"acme - 59": "3", "acme emails 59": "2", "bob - 0": "1", "acme - 59 d": "4"},
        101: {"acme - 0": "5", "garbage": "1", "acme - x": "1"},
    }
    traffic = group_traffic(minutes, Scope.parse("tenant:*"), 100 * 60 + 30, {}, frozenset())
    assert set(traffic) == {"tenant:acme"}  # bob's second is before the window
    assert traffic["tenant:acme"].work == {6059: 5.0, 6060: 5.0}
    assert traffic["tenant:acme"].denied == 4


# -- on a real Redis -------------------------------------------------------------------------
def recorded(client: redis.Redis, limiter: Limiter) -> dict[str, float]:
    """Every recorded field summed over the minutes (cost, or denials for " d" fields)."""
    totals: dict[str, float] = {}
    for key in client.scan_iter(f"{limiter.keys.base}:rec:*"):
        assert 0 < client.pttl(key) <= (600 + 60) * 1000
        for field, value in client.hgetall(key).items():
            tenant, queue, _second, *denial = field.decode().split(" ")
            what = " ".join([tenant, queue, *denial])
            totals[what] = totals.get(what, 0) + float(value)
    return totals


def test_recording_counts_every_decision_while_on(
    limiter: Limiter, redis_client: redis.Redis
) -> None:
    limiter.set_limit("tenant:*", "1000/s")
    limiter.set_limit("tenant:carol", Limit(1, per=HOUR))
    limiter.acquire("acme")
    assert recorded(redis_client, limiter) == {}  # off by default: nothing kept

    assert limiter.recording() is None
    limiter.set_recording(600)
    assert limiter.recording() == 600
    for _ in range(7):
        assert limiter.acquire("acme", "emails").allowed
    assert limiter.acquire("acme", cost=2.5).allowed
    limiter.set_limit("tenant:whale", Limit(1e9, burst=1e12))
    assert limiter.acquire("whale", cost=1e12).allowed
    assert [limiter.acquire("carol").allowed for _ in range(3)] == [True, False, False]
    limiter.peek("acme")
    limiter.refund("acme")
    scheduler = FairScheduler(limiter)
    scheduler.submit("dave", "job", queue="reports")
    assert scheduler.dispatch(["reports"]).items

    assert recorded(redis_client, limiter) == {
        "acme emails": 7,
        "acme -": 2.5,
        "whale -": 1e12,
        "carol -": 1,
        "carol - d": 2,
        "dave reports": 1,
    }
    limiter.set_recording(None)
    limiter.acquire("acme")
    assert recorded(redis_client, limiter)["acme -"] == 2.5


def test_a_preview_replays_the_recorded_work_under_the_proposed_limit(
    limiter: Limiter, redis_client: redis.Redis
) -> None:
    limiter.set_limit("tenant:*", "1000/s")
    limiter.set_limit("tenant:carol", Limit(1, per=HOUR))
    limiter.set_exempt("vip")
    with pytest.raises(ConfigError, match="not being recorded"):
        limiter.preview("tenant:*", "10/s")
    limiter.set_recording(600)
    for _ in range(50):
        limiter.acquire("acme", "emails")
    for _ in range(5):
        limiter.acquire("bob")
    for _ in range(40):
        limiter.acquire("vip")
    for _ in range(3):
        limiter.acquire("carol")
    version = limiter.config_version()

    result = limiter.preview("tenant:*", Limit(10, burst=10))

    by_bucket = {b.scope: b for b in result.buckets}
    # carol has a limit of her own and vip is exempt: tenant:* governs neither.
    assert set(by_bucket) == {"tenant:acme", "tenant:bob"}
    assert result.buckets[0].scope == "tenant:acme"
    assert by_bucket["tenant:acme"].work == 50
    # The 50 fell within one or two seconds: at most 10 + 10 ran at once, at least 10.
    assert 30 <= by_bucket["tenant:acme"].delayed <= 40
    assert by_bucket["tenant:acme"].max_delay_s == pytest.approx(
        by_bucket["tenant:acme"].delayed / 10, abs=1
    )
    assert by_bucket["tenant:bob"].delayed == 0
    assert result.work == 55
    assert result.delayed == by_bucket["tenant:acme"].delayed
    assert result.current == Limit(1000)
    assert result.current_delayed == 0
    assert result.window_s == 600
    assert limiter.config_version() == version  # a preview changes nothing

    carol = limiter.preview("tenant:carol", "1/s", window=60)
    assert (carol.work, carol.denied, carol.current) == (1, 2, Limit(1, per=HOUR))
    everyone = limiter.preview("global", "1000/s")
    assert everyone.work == 55 + 40 + 1
    assert everyone.delayed == 0
    assert limiter.preview("queue:sms", "1/s").buckets == ()


def test_a_preview_takes_windows_and_credit_as_set_limit_does(
    limiter: Limiter, redis_client: redis.Redis
) -> None:
    limiter.set_limit("tenant:*", ["1000/s", "100000/d"])
    limiter.set_recording(600)
    for _ in range(60):
        assert limiter.acquire("acme").allowed

    plain = limiter.preview("tenant:*", Limit(10, burst=10))
    banked = limiter.preview("tenant:*", Limit(10, burst=10, credit=50))
    # The 60 fell within a second or two: bucket and bank take them all at once.
    assert plain.delayed >= 40
    assert banked.delayed == 0
    assert banked.windows == (Limit(10, burst=10, credit=50),)

    # A daily window of 30 under the same per-second one: 30 of the 60 wait for the day.
    daily = limiter.preview("tenant:*", ["10/s", "30/d"])
    assert daily.windows == (Limit(10), Limit(30, per=86400))
    assert daily.limit == Limit(10)
    assert daily.delayed == pytest.approx(plain.delayed)  # the same 10 at once...
    assert daily.backlog_at_end >= 30  # ...but 30 wait for the day's refill
    assert daily.max_delay_s > 86400 / 30 * 29
    # The current limit is replayed with every window too.
    assert daily.current_windows == (Limit(1000), Limit(100000, per=86400))
    assert daily.current_delayed == 0
    with pytest.raises(InvalidLimit):
        limiter.preview("tenant:*", ["10/s", "10/s"])
    fields = preview_fields(daily)
    assert fields["limit"] == "10/s burst 10 + 30/d burst 30"
    assert fields["current"] == "1000/s burst 1000 + 100000/d burst 100000"


@pytest.mark.parametrize("seconds", [0, 59, 86_401, math.nan, True, "600"])
def test_recording_needs_a_sensible_length(limiter: Limiter, seconds: object) -> None:
    with pytest.raises(ConfigError, match="60 to 86400 seconds"):
        limiter.set_recording(seconds)  # type: ignore[arg-type]
    assert limiter.recording() is None


@pytest.mark.parametrize("window", [0, -1, 601, math.inf, True])
def test_a_preview_window_must_be_within_the_recording(limiter: Limiter, window: object) -> None:
    limiter.set_recording(600)
    with pytest.raises(ConfigError, match="window must be"):
        limiter.preview("global", "1/s", window=window)  # type: ignore[arg-type]
