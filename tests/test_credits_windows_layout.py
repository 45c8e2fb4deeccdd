"""A window's state follows its period when a scope's windows change (#13 follow-up): going
from a lone long window to several, or back, neither starts the long window afresh (a
day's quota once more) nor reads another window's state as its own."""

from __future__ import annotations

import pytest
import redis
from test_credits_windows import VirtualClock

from queue_ratelimit import Limit, Limiter, ScopeLimit
from queue_ratelimit._keys import KeySpace
from queue_ratelimit.metrics import snapshot

DAY = ["5/s", "10/d"]


def spend(limiter: Limiter, tenant: str, n: int) -> None:
    for _ in range(n):
        assert limiter.acquire(tenant).allowed


def admitted(limiter: Limiter, tenant: str, most: int = 50) -> int:
    """How many single jobs the tenant is admitted now (at most ``most``)."""
    for n in range(most):
        if not limiter.acquire(tenant).allowed:
            return n
    return most


def test_a_lone_daily_window_keeps_its_state_when_a_short_one_is_added(
    limiter: Limiter,
) -> None:
    limiter.set_limit("tenant:acme", "10/d")
    spend(limiter, "acme", 10)
    limiter.set_limit("tenant:acme", DAY)
    decision = limiter.acquire("acme")
    assert not decision.allowed, "the day's quota was handed out again"
    assert (decision.denied_by, decision.window) == ("tenant:acme", "10/d")
    assert decision.wait_ms > 3_600_000
    # What is set is what get_limit returns, wherever the state is kept.
    assert limiter.get_limit("tenant:acme") == ScopeLimit(
        "tenant:acme", Limit(5), windows=(Limit(5), Limit(10, per=86400))
    )


def test_dropping_the_short_window_keeps_the_daily_state(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", DAY)
    spend(limiter, "acme", 5)  # the second's 5: the day has 5 left
    limiter.set_limit("tenant:acme", "10/d")
    assert admitted(limiter, "acme") == 5


@pytest.mark.parametrize("start", ["10/d", DAY], ids=["from one", "from two"])
def test_back_and_forth_the_day_admits_its_quota_once(
    limiter: Limiter, start: str | list[str]
) -> None:
    limiter.set_limit("tenant:acme", start)
    clock = VirtualClock(limiter, "acme")
    spend(limiter, "acme", 4)
    for change in (DAY, "10/d", DAY, "10/d"):
        limiter.set_limit("tenant:acme", change)
        clock.advance(1)  # (a second: the per-second window full again)
        spend(limiter, "acme", 1)
    assert admitted(limiter, "acme") == 2


def test_a_tenants_own_windows_take_over_its_defaults_state(limiter: Limiter) -> None:
    limiter.set_limit("tenant:*", "10/d")
    spend(limiter, "acme", 10)
    limiter.set_limit("tenant:acme", DAY)
    VirtualClock(limiter, "acme").advance(1)
    decision = limiter.acquire("acme")
    assert (decision.allowed, decision.window) == (False, "10/d")
    assert admitted(limiter, "bob") == 10  # a tenant of the default as before


def test_a_new_window_starts_full_and_the_old_ones_keep_theirs(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", "5/s")
    spend(limiter, "acme", 5)
    limiter.set_limit("tenant:acme", DAY)
    decision = limiter.acquire("acme")
    assert not decision.allowed
    assert decision.window == "5/s"
    assert decision.remaining["tenant:acme (10/d)"] == 10


def test_the_marks_are_written_only_where_needed(
    limiter: Limiter, redis_client: redis.Redis
) -> None:
    def stored() -> str:
        return redis_client.hget(limiter.keys.config, "tenant:acme").decode()

    limiter.set_limit("tenant:acme", "10/d")
    assert stored() == "10.0 86400.0 10.0 -"
    version = limiter.set_limit("tenant:acme", [Limit(5, credit=3), "10/d"])
    assert stored() == "5.0 1.0 5.0 -@w1c3.0;10.0 86400.0 10.0 -@"
    # Setting the same again changes nothing (the marks are computed before comparing).
    assert limiter.set_limit("tenant:acme", [Limit(5, credit=3), "10/d"]) == version
    item = limiter.get_limit("tenant:acme")
    assert item.windows == (Limit(5, credit=3), Limit(10, per=86400))
    assert KeySpace.window_fields("b", [1, 86400], item._places) == ["b:w1", "b"]
    limiter.set_limit("tenant:acme", "10/d")
    assert stored() == "10.0 86400.0 10.0 -"
    limiter.set_limit("tenant:acme", DAY)
    assert stored() == "5.0 1.0 5.0 -@w1;10.0 86400.0 10.0 -@"
    limiter.set_limit("tenant:bob", DAY)  # no history: the default layout
    assert redis_client.hget(limiter.keys.config, "tenant:bob").decode() == (
        "5.0 1.0 5.0 -;10.0 86400.0 10.0 -"
    )


def test_metrics_read_each_window_where_it_is_kept(limiter: Limiter) -> None:
    limiter.set_limit("global", "10/d")
    spend(limiter, "acme", 4)
    limiter.set_limit("global", DAY)
    buckets = snapshot(limiter)["buckets"]
    assert buckets["global (10/d)"]["tokens"] == pytest.approx(6, abs=0.01)
    assert buckets["global"]["tokens"] == pytest.approx(5, abs=0.01)
